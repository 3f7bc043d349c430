"""A model's calls read from its text in each format it may have learned, whole and while streaming."""

from __future__ import annotations

import json

import pytest

from backend.inference.tool_calls import CallStream, parse_answer

NAMES = {"get_weather", "get_time"}
FALLBACK = ('Let me look.\n{"tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},'
            ' {"id": "call_2", "name": "get_time", "arguments": {"zone": "CET"}}]}')
HERMES = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>')
LLAMA = ' {"name": "get_weather", "parameters": {"city": "Paris"}}'


def _calls(text: str) -> list[tuple[str, dict[str, object]]]:
    parsed = parse_answer(text, NAMES)
    assert parsed is not None
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in parsed.tool_calls]


def test_safetrains_fallback_calls_are_read_with_the_content_before_them() -> None:
    parsed = parse_answer(FALLBACK, NAMES)
    assert parsed is not None and parsed.content == "Let me look."
    assert _calls(FALLBACK) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert all(call["type"] == "function" and call["id"].startswith("call_") for call in parsed.tool_calls)
    again = parse_answer(FALLBACK, NAMES)
    assert again is not None and again.tool_calls[0]["id"] != parsed.tool_calls[0]["id"], "ids are fresh each answer"


def test_hermes_blocks_and_llamas_json_call_are_read() -> None:
    parsed = parse_answer(HERMES, NAMES)
    assert parsed is not None and parsed.content == "Checking."
    assert _calls(HERMES) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    only_calls = parse_answer(LLAMA, NAMES)
    assert only_calls is not None and only_calls.content is None
    assert _calls(LLAMA) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    '{"answer": 42}',  # a JSON answer, not a call
    FALLBACK.replace("get_time", "get_stock"),  # a tool nobody declared
    FALLBACK.replace('{"zone": "CET"}', '"CET"'),  # arguments that are not an object
    FALLBACK[:-3],  # cut before its end
    HERMES.replace('"city": "Paris"}}', '"city": "Paris"}'),  # a block that is not JSON
    '{"tool_calls": "get_weather"}',
], ids=["plain", "json-answer", "undeclared", "not-an-object", "cut", "bad-block", "calls-not-a-list"])
def test_an_answer_without_valid_calls_is_left_as_its_text(text: str) -> None:
    assert parse_answer(text, NAMES) is None


@pytest.mark.parametrize("text", [FALLBACK, HERMES, LLAMA, "Plain words,\nthen more.  ", '{"answer": 42}',
                                  "Not <tool_ a call", FALLBACK[:-3]],
                         ids=["fallback", "hermes", "llama", "plain", "json-answer", "marker-prefix", "cut"])
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_streamed_content_adds_up_to_the_whole_answers_and_never_shows_a_call(text: str, piece: int) -> None:
    stream = CallStream(NAMES)
    streamed = "".join(stream.feed(text[start:start + piece]) for start in range(0, len(text), piece))
    rest, parsed = stream.finish()
    whole = parse_answer(text, NAMES)
    assert streamed + rest == (text if whole is None else whole.content or "")
    assert "get_weather" not in streamed and "<tool_call>" not in streamed and "tool_calls" not in streamed
    assert (parsed is None) == (whole is None)
    if text.startswith("Plain"):
        assert streamed == "Plain words,\nthen more." and rest == "  ", "content streams as it comes"
