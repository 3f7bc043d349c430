"""A model's tool calls found in its text and returned as OpenAI's `tool_calls` (or a legacy `function_call`).

A model calls a tool by writing the call in the format it learned. Three are read:
- safetrain's plain fallback (chat_tools.py), which models trained without a tools-aware template learn: a line
  `{"tool_calls": [{"id", "name", "arguments": {...}}]}`, after the turn's content if any;
- Hermes / Qwen blocks, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call;
- Llama 3.1's JSON call, the whole answer one object `{"name": ..., "parameters": {...}}`.
A call must name a declared tool and carry an object of arguments; an answer with any call that is not so is
returned as the text it is, so nothing the model wrote is lost.

The content of an answer with calls is the text before the first call and after the last one. While streaming,
text that may begin a call is held back (`CallStream`) until it is known to be content, so the streamed deltas
always add up to the whole answer's content.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

_FALLBACK_MARKER = '{"tool_calls"'
_BLOCK_OPEN, _BLOCK_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(_BLOCK_OPEN) + r"(.*?)" + re.escape(_BLOCK_CLOSE), re.DOTALL)
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer split into its content (None when it is only calls) and its calls in OpenAI's shape."""

    content: str | None
    tool_calls: list[dict[str, Any]]


def parse_answer(text: str, tool_names: set[str]) -> ParsedAnswer | None:
    """The calls in `text` and the content around them; None when it holds no call (or one that is not valid)."""
    for find in (_fallback_calls, _block_calls, _json_call):
        found = find(text)
        if found is None:
            continue
        calls, start, end = found
        if not calls or not all(_valid(call, tool_names) for call in calls):
            return None
        content = (text[:start].rstrip() + text[end:].rstrip()) or None
        return ParsedAnswer(content, [_openai_call(call) for call in calls])
    return None


def _fallback_calls(text: str) -> tuple[list[Any], int, int] | None:
    start = _line_start(text, _FALLBACK_MARKER)
    if start is None:
        return None
    try:
        value, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return [None], start, len(text)  # a call begun but not valid JSON: not a call
    calls = value.get("tool_calls") if isinstance(value, dict) else None
    if not isinstance(calls, list):
        return [None], start, end
    return [_as_call(call, "arguments") for call in calls], start, end


def _block_calls(text: str) -> tuple[list[Any], int, int] | None:
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return None
    calls = [_as_call(_loads(block.group(1)), "arguments") for block in blocks]
    return calls, blocks[0].start(), blocks[-1].end()


def _json_call(text: str) -> tuple[list[Any], int, int] | None:
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    value = _loads(stripped)
    if not isinstance(value, dict) or "name" not in value:
        return None  # a JSON answer, not a call
    key = "parameters" if "parameters" in value else "arguments"
    return [_as_call(value, key)], 0, len(text)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _as_call(value: Any, arguments_key: str) -> dict[str, Any] | None:
    """{"name", "arguments"} from one written call; arguments given as a JSON string are read as the object."""
    if not isinstance(value, dict):
        return None
    arguments = value.get(arguments_key, {})
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    return {"name": value.get("name"), "arguments": arguments}


def _valid(call: dict[str, Any] | None, tool_names: set[str]) -> bool:
    return call is not None and call["name"] in tool_names and isinstance(call["arguments"], dict)


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    # A fresh id each call: the ids a model learned ("call_1") repeat from turn to turn.
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def _line_start(text: str, marker: str) -> int | None:
    """Where the first line that begins with `marker` begins."""
    if text.startswith(marker):
        return 0
    found = text.find("\n" + marker)
    return None if found < 0 else found + 1


class CallStream:
    """One streamed choice: passes on the text that cannot be part of a call, holds back what may be."""

    def __init__(self, tool_names: set[str]) -> None:
        self.tool_names = tool_names
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> str:
        """The part of the text so far that is content whatever comes next, not passed on before."""
        self.text += delta
        safe = max(self.emitted, self._content_end())
        out, self.emitted = self.text[self.emitted:safe], safe
        return out

    def finish(self) -> tuple[str, ParsedAnswer | None]:
        """The content not yet passed on, and the calls (None when the answer holds none)."""
        parsed = parse_answer(self.text, self.tool_names)
        content = self.text if parsed is None else parsed.content or ""
        return content[self.emitted:], parsed

    def _content_end(self) -> int:
        """How far the text is surely content: up to where a call may begin, trailing whitespace held back."""
        text = self.text
        if text.lstrip().startswith("{"):
            return 0  # may be a whole-answer JSON call
        cut = _partial_marker_start(text)
        block = text.find(_BLOCK_OPEN)
        if block >= 0:
            cut = min(cut, block)
        line = _line_start(text, _FALLBACK_MARKER)
        if line is not None:
            cut = min(cut, line)
        return len(text[:cut].rstrip())


def _partial_marker_start(text: str) -> int:
    """Where an unfinished marker at the text's end begins (the text's length when there is none)."""
    last_line = text.rfind("\n") + 1
    if _FALLBACK_MARKER.startswith(text[last_line:]) and text[last_line:]:
        return last_line
    for size in range(min(len(_BLOCK_OPEN) - 1, len(text)), 0, -1):
        if _BLOCK_OPEN.startswith(text[-size:]):
            return len(text) - size
    return len(text)
