"""The text a model continues, rendered exactly as training rendered what came before an answer.

Training renders each example with `render_segments` (the tokenizer's chat template, or the plain fallback for
tokenizers without one; a bos where the tokenizer adds one). Here the request is rendered by that same function
with a placeholder answer, and the text before the placeholder is the prompt: the assistant header, the template's
special tokens and the bos all come out as the model saw them while it learned.
"""

from __future__ import annotations

from typing import Any

from backend.training.datasets import DatasetError, render_segments

# Private-use characters: no template writes them and no tokenizer maps them to anything a user would send.
_ANSWER = "\ue000\ue001safetrain-answer\ue001\ue000"


class RenderError(ValueError):
    """The model's chat template refused the conversation (e.g. roles that must alternate)."""


def _before_answer(example: dict[str, Any], fmt: Any, tokenizer: Any) -> str:
    try:
        text = "".join(piece for piece, _ in render_segments(example, fmt, tokenizer))
    except DatasetError as error:
        raise RenderError(error.reason) from None
    cut = text.rfind(_ANSWER)
    if cut < 0:
        raise RenderError("the model's chat template dropped the answer; it cannot be prompted")
    return text[:cut]


def chat_prompt(messages: list[dict[str, Any]], tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation (and its tools) as training rendered it, up to where the assistant's answer begins.

    Tools go through the template's tools support, or the plain fallback where it has none (chat_tools.py).
    """
    example: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": _ANSWER}]}
    if tools:
        example["tools"] = tools
    return _before_answer(example, "chat", tokenizer)


def completion_prompt(prompt: str, tokenizer: Any) -> str:
    """A prompt as training rendered prompt/completion lines (a bos first where the tokenizer adds one)."""
    return _before_answer({"prompt": prompt, "completion": _ANSWER}, "prompt_completion", tokenizer)


def prompt_ids(text: str, tokenizer: Any) -> list[int]:
    """Token ids of the rendered prompt: special tokens are in the text already, as in training."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
