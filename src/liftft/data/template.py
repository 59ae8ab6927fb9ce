"""The prompt template and its tokenization, written once and shared by training and evaluation."""

from __future__ import annotations

TEMPLATES = ("alpaca", "chat")

_ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def build_prompt(record: dict, template: str = "alpaca", tokenizer=None) -> str:
    """The text the model sees before its response.

    ``record`` holds ``instruction`` and optionally ``input``; a non-empty input
    appears under an "### Input:" section. ``template="alpaca"`` is the
    LLM-Adapters template the LIFT paper used; ``template="chat"`` renders the
    tokenizer's chat template with a generation prompt (``tokenizer`` required).
    The response text follows the returned prompt directly.
    """
    instruction = record["instruction"].strip()
    extra = (record.get("input") or "").strip()
    if template == "alpaca":
        if extra:
            return f"{_ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n### Response:\n"
        return f"{_ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer that has a chat_template")
        content = f"{instruction}\n\n{extra}" if extra else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; allowed: {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, exactly as both training and generation feed them.

    The tokenizer adds its special tokens (BOS), unless the prompt already
    begins with the BOS text, as chat templates that render ``{{ bos_token }}``
    do: adding it again would give two.
    """
    bos = tokenizer.bos_token
    renders_bos = bool(bos) and prompt.startswith(bos)
    return tokenizer(prompt, add_special_tokens=not renders_bos)["input_ids"]


def encode_response(tokenizer, prompt: str, response: str) -> list[int]:
    """The ids of ``response`` as it follows ``prompt``: the one response tokenization of training and scoring.

    The pair is tokenized together and split where the prompt's own ids end,
    so a response gets the ids it has in context. Tokenized alone, its start
    would read as the start of a text, and SentencePiece-style tokenizers
    (Llama-2, Mistral) would give it a word-boundary "▁" it does not have after
    the prompt. Where the pair's ids do not begin with the prompt's (the
    prompt's end merged with the response's start into one token), the
    response is tokenized after an EOS, which merges with nothing, so that
    the prompt's ids, which generation feeds, stay as they are. No EOS is
    appended.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    pair_ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    if pair_ids[: len(prompt_ids)] == prompt_ids:
        return pair_ids[len(prompt_ids) :]
    if tokenizer.eos_token:
        anchored = tokenizer(tokenizer.eos_token + response, add_special_tokens=False)["input_ids"]
        if anchored[:1] == [tokenizer.eos_token_id]:
            return anchored[1:]
    # No EOS, or the tokenizer did not read its text as the special token.
    return tokenizer(response, add_special_tokens=False)["input_ids"]
