"""The prompt template, written once and shared by training and evaluation."""

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

    Training appends the response's ids to these, so the prompt/response seam
    can never shift by a token between training and evaluation.
    """
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]
