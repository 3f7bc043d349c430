"""The validator on OpenAI's full chat dialect: message weights, tool use, and preference (DPO) lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from backend.training.dataset_validation import DatasetError, DatasetSummary, DatasetValidator, validate_file

USER = {"role": "user", "content": "What is the weather in Paris?"}
ANSWER = {"role": "assistant", "content": "Sunny."}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather of a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_LINE = {
    "tools": [WEATHER_TOOL],
    "messages": [
        USER,
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
        ANSWER,
    ],
}
LEGACY_LINE = {
    "functions": [WEATHER_TOOL["function"]],
    "messages": [
        USER,
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": '{"sky": "clear"}'},
        ANSWER,
    ],
}
WEIGHTED_LINE = {"messages": [USER, {"role": "assistant", "content": "Rainy.", "weight": 0}, USER,
                              {"role": "assistant", "content": "Sunny.", "weight": 1}]}
PREFERENCE_LINE = {
    "input": {"messages": [USER], "tools": [WEATHER_TOOL]},
    "preferred_output": [{"role": "assistant", "content": "Sunny, 21 degrees."}],
    "non_preferred_output": [{"role": "assistant", "content": "I don't know."}],
}


def jsonl(*records: Any) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def validated(data: bytes, tmp_path: Path) -> DatasetSummary:
    """The whole-file answer, checked to equal the streamed one (3-byte chunks)."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    streamed = DatasetValidator()
    for start in range(0, len(data), 3):
        streamed.feed(data[start : start + 3])
    summary = validate_file(path)
    assert streamed.finish() == summary
    return summary


def refusal(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as caught:
        validate_file(path)
    return str(caught.value)


def with_messages(line: dict[str, Any], index: int, message: dict[str, Any]) -> dict[str, Any]:
    messages = list(line["messages"])
    messages[index] = message
    return {**line, "messages": messages}


def test_each_new_shape_validates_with_its_format(tmp_path: Path) -> None:
    assert validated(jsonl(WEIGHTED_LINE, WEIGHTED_LINE), tmp_path) == DatasetSummary("chat", 2)
    assert validated(jsonl(TOOL_LINE, LEGACY_LINE), tmp_path) == DatasetSummary("chat_tools", 2)
    assert validated(jsonl(PREFERENCE_LINE) * 3, tmp_path) == DatasetSummary("preference", 3)


def test_tool_lines_and_plain_chat_lines_share_a_file_which_is_chat_tools(tmp_path: Path) -> None:
    plain = {"messages": [USER, ANSWER]}
    assert validated(jsonl(plain, TOOL_LINE, plain), tmp_path) == DatasetSummary("chat_tools", 3)
    assert validated(jsonl(TOOL_LINE, plain, plain), tmp_path) == DatasetSummary("chat_tools", 3)


def test_content_may_be_absent_or_null_beside_tool_calls(tmp_path: Path) -> None:
    null_content = with_messages(TOOL_LINE, 1, {"role": "assistant", "content": None, "tool_calls": [CALL]})
    assert validated(jsonl(null_content), tmp_path) == DatasetSummary("chat_tools", 1)
    # Without calls, content stays required.
    assert refusal(jsonl(with_messages(TOOL_LINE, 3, {"role": "assistant", "content": None})), tmp_path) == (
        'Line 1: message 4 "content" must be a string, not null'
    )


BAD_LINES: dict[str, tuple[dict[str, Any], str]] = {
    "weight 2": (with_messages(WEIGHTED_LINE, 1, {**ANSWER, "weight": 2}), 'message 2 "weight" must be 0 or 1 (got 2)'),
    "weight 0.5": (with_messages(WEIGHTED_LINE, 1, {**ANSWER, "weight": 0.5}),
                   'message 2 "weight" must be 0 or 1 (got 0.5)'),
    "weight true": (with_messages(WEIGHTED_LINE, 1, {**ANSWER, "weight": True}),
                    'message 2 "weight" must be 0 or 1 (got true)'),
    "weight on a user": (with_messages(WEIGHTED_LINE, 0, {**USER, "weight": 1}),
                         'message 1 has a "weight", which only assistant messages may carry'),
    "arguments an object": (
        with_messages(TOOL_LINE, 1, {"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
        'message 2 tool call 1 "arguments" must be a JSON string naming an object (got {"city": "Paris"})'),
    "arguments not JSON": (
        with_messages(TOOL_LINE, 1, {"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_weather", "arguments": "city=Paris"}}]}),
        'message 2 tool call 1 "arguments" must be a JSON string naming an object (got "city=Paris")'),
    "arguments a JSON list": (
        with_messages(TOOL_LINE, 1, {"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_weather", "arguments": "[1]"}}]}),
        'message 2 tool call 1 "arguments" must be a JSON string naming an object (got "[1]")'),
    "unknown tool": (
        with_messages(TOOL_LINE, 1, {"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_time", "arguments": "{}"}}]}),
        "message 2 tool call 1 calls \"get_time\", which is not in the line's \"tools\""),
    "a call without tools": ({"messages": TOOL_LINE["messages"]},
                             "message 2 tool call 1 calls \"get_weather\", which is not in the line's \"tools\""),
    "an answer to no call": (with_messages(TOOL_LINE, 2, {"role": "tool", "tool_call_id": "call_9", "content": "x"}),
                             'message 3 answers tool call "call_9", which no earlier assistant message made'),
    "an answer before its call": (
        {**TOOL_LINE, "messages": [USER, TOOL_LINE["messages"][2], TOOL_LINE["messages"][1], ANSWER]},
        'message 2 answers tool call "call_1", which no earlier assistant message made'),
    "a tool message without its id": (with_messages(TOOL_LINE, 2, {"role": "tool", "content": "x"}),
                                      'message 3 has no "tool_call_id"'),
    "a call without an id": (with_messages(TOOL_LINE, 1, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": CALL["function"]}]}), 'message 2 tool call 1 has no "id"'),
    "tool calls on a user": (with_messages(TOOL_LINE, 0, {**USER, "tool_calls": [CALL]}),
                             'message 1 has "tool_calls", which only assistant messages may carry'),
    "tools not a list": ({**TOOL_LINE, "tools": WEATHER_TOOL}, '"tools" must be a list, not an object'),
    "a tool without a name": ({**TOOL_LINE, "tools": [{"type": "function", "function": {"description": "x"}}]},
                              'tool 1 has no "name"'),
    "legacy call to an unknown function": (
        with_messages(LEGACY_LINE, 1, {"role": "assistant", "function_call": {"name": "nope", "arguments": "{}"}}),
        "message 2 function_call calls \"nope\", which is not in the line's \"tools\""),
    "legacy answer to no call": (
        {**LEGACY_LINE, "messages": [USER, LEGACY_LINE["messages"][2], ANSWER]},
        'message 2 answers function "get_weather", which no earlier "function_call" called'),
    "preference output of two messages": ({**PREFERENCE_LINE, "preferred_output": [ANSWER, ANSWER]},
                                          '"preferred_output" must be a list of exactly one assistant message'),
    "preference output from the user": (
        {**PREFERENCE_LINE, "non_preferred_output": [USER]},
        'non_preferred_output message 1 must be an assistant message (got role "user")'),
    "preference input ending with the assistant": (
        {**PREFERENCE_LINE, "input": {"messages": [USER, ANSWER]}},
        '"input.messages" must end with a user or tool message (the last is "assistant")'),
    "preference without its rejected output": (
        {key: value for key, value in PREFERENCE_LINE.items() if key != "non_preferred_output"},
        'missing key "non_preferred_output"'),
    "preference output calling an unknown tool": (
        {**PREFERENCE_LINE, "preferred_output": [{"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_time", "arguments": "{}"}}]}]},
        "preferred_output message 1 tool call 1 calls \"get_time\", which is not in the line's \"tools\""),
    "preference input message without content": ({**PREFERENCE_LINE, "input": {"messages": [{"role": "user"}]}},
                                                 'input message 1 has no "content"'),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_is_named_with_its_message(case: str, tmp_path: Path) -> None:
    line, reason = BAD_LINES[case]
    good = PREFERENCE_LINE if "input" in line or "preferred_output" in line else TOOL_LINE
    assert refusal(jsonl(good, good, line), tmp_path) == f"Line 3: {reason}"


def test_a_preference_outputs_may_reuse_one_call_id(tmp_path: Path) -> None:
    calling = {"role": "assistant", "tool_calls": [CALL]}
    other = {"role": "assistant", "tool_calls": [{**CALL, "function": {**CALL["function"], "arguments": "{}"}}]}
    line = {**PREFERENCE_LINE, "preferred_output": [calling], "non_preferred_output": [other]}
    assert validated(jsonl(line), tmp_path) == DatasetSummary("preference", 1)


def test_a_file_mixing_chat_and_preference_names_the_first_line_that_differs(tmp_path: Path) -> None:
    assert refusal(jsonl(TOOL_LINE, TOOL_LINE, PREFERENCE_LINE, TOOL_LINE), tmp_path) == (
        'Line 3: this line is "preference" but the file is "chat_tools" (from line 1); one file holds one format'
    )
    assert refusal(jsonl(PREFERENCE_LINE, {"messages": [USER, ANSWER]}), tmp_path) == (
        'Line 2: this line is "chat" but the file is "preference" (from line 1); one file holds one format'
    )


def test_a_file_with_nothing_to_train_on_is_refused(tmp_path: Path) -> None:
    context_only = with_messages(WEIGHTED_LINE, 3, {**ANSWER, "weight": 0})
    assert refusal(jsonl(context_only, context_only), tmp_path) == (
        "nothing to train on: every assistant message in the file has weight 0"
    )
    # One line with a target is enough, whichever path (plain or exact) read it.
    assert validated(jsonl(context_only, {"messages": [USER, ANSWER]}), tmp_path) == DatasetSummary("chat", 2)
    assert validated(jsonl(context_only, WEIGHTED_LINE), tmp_path) == DatasetSummary("chat", 2)
