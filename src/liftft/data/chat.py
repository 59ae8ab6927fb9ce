"""Conversations rendered with the tokenizer's chat template and cut into the text trained on and the text around it.

The cut points come from rendering prefixes of the conversation, never from
searching its text: a turn that is trained on begins where the rendering of
the turns before it with the generation prompt ends, and ends where the
rendering of the turns up to it ends, the template's end-of-turn text included.
Each of those renderings must begin the rendering of the whole conversation;
a template for which they do not cannot be masked exactly and is refused.
"""

from __future__ import annotations

# A piece of the rendered text and whether the loss sees its tokens.
Segment = tuple[str, bool]


def messages_segments(tokenizer, messages: list[dict]) -> list[Segment]:
    """Segments of a ``messages`` conversation, each assistant turn trained on, the rest context.

    An assistant turn that opens the conversation is context: nothing prompts it.
    """
    spans = [(i, i + 1) for i, turn in enumerate(messages) if i and turn["role"] == "assistant"]
    return _segments(tokenizer, messages, spans)


def completion_segments(tokenizer, prompt: list[dict], completion: list[dict]) -> list[Segment]:
    """Segments of TRL's conversational prompt/completion: the prompt's turns are context, the completion trained."""
    return _segments(tokenizer, prompt + completion, [(len(prompt), len(prompt) + len(completion))])


# Roles whose turns answer (or feed an answer): a conversation is never cut just before one of them, nor is a system
# prompt at its start ever dropped.
_ANSWERING = ("assistant", "tool", "function", "ipython")
_SYSTEM = ("system", "developer")


def without_first_exchanges(turns: list[dict], before: int | None = None) -> list[list[dict]]:
    """``turns`` without its first 1, 2, ... exchanges, each dropped whole, fewest first; the system prompt is kept.

    An exchange begins at a turn that is neither an answer nor a tool's (a user's) right after an answer or a tool's
    turn, so every assistant turn that is kept keeps all the turns between it and the answer before it. Only turns
    before index ``before`` (a completion's start) may be dropped; by default, any.
    """
    system = 0
    while system < len(turns) and turns[system]["role"] in _SYSTEM:
        system += 1
    end = len(turns) if before is None else before
    starts = [k for k in range(system + 1, end)
              if turns[k]["role"] not in _ANSWERING and turns[k - 1]["role"] in _ANSWERING]
    return [turns[:system] + turns[k:] for k in starts]


def check_chat_template(tokenizer) -> None:
    """Raise ValueError unless the tokenizer has a chat template to render conversations with."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"conversational records (messages, or prompt/completion turns) are rendered with the tokenizer's chat "
            f"template, and the tokenizer {name!r} has none: use a model whose tokenizer has one (an instruct or "
            "chat model), or instruction/output or prompt/completion string records"
        )


def _segments(tokenizer, turns: list[dict], spans: list[tuple[int, int]]) -> list[Segment]:
    """The rendered conversation cut at the spans of turns ``[start, end)`` that are trained on.

    Text after the last trained span is left out: nothing there is learned.
    """
    check_chat_template(tokenizer)
    whole = _render(tokenizer, turns, generation_prompt=False)
    segments, done = [], 0
    for start, end in spans:
        begin = _prefix_length(whole, _render(tokenizer, turns[:start], generation_prompt=True), turns, start)
        finish = _prefix_length(whole, _render(tokenizer, turns[:end], generation_prompt=False), turns, end)
        if begin < done or finish < begin:
            raise ValueError(f"{_named(turns)}: the chat template's renderings of its turns overlap, so the "
                             "assistant turns cannot be masked exactly")
        segments += [(whole[done:begin], False), (whole[begin:finish], True)]
        done = finish
    return segments


def _render(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise ValueError(f"{_named(turns)}: the chat template cannot render it: {err}") from err


def _prefix_length(whole: str, prefix: str, turns: list[dict], count: int) -> int:
    if not whole.startswith(prefix):
        raise ValueError(
            f"{_named(turns)}: the chat template renders its first {count} turns as text that does not begin the "
            "whole conversation's rendering, so the assistant turns cannot be masked exactly; use a template "
            "whose rendering of a conversation begins with the rendering of its first turns"
        )
    return len(prefix)


def _named(turns: list[dict]) -> str:
    """A conversation named by how it starts: records lose their file and index once split for validation."""
    return f"the conversation starting {turns[0]['content'][:60]!r}"
