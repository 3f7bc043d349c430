"""protocol.py: a chat request's tools, tool choice and tool conversation, checked as training checks a
tool-use line, each fault a 400 naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from backend.inference.protocol import Limits, parse_request
from backend.services.errors import InvalidRequest
from tests.inference.test_engine import TOOL_CHAT, WEATHER

LIMITS = Limits(max_tokens=16, max_n=2)
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def chat(**body: Any) -> Any:
    return parse_request({"model": "m", "messages": ASK, **body}, kind="chat", limits=LIMITS)


def test_tools_and_a_tool_conversation_are_kept_for_the_template() -> None:
    request = chat(messages=TOOL_CHAT, tools=[WEATHER], tool_choice="auto")

    assert request.tools == [WEATHER]
    call, answer = request.messages[1], request.messages[2]
    assert call == {"role": "assistant", "tool_calls": TOOL_CHAT[1]["tool_calls"]}  # null content left out
    assert answer == {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}
    assert chat(tools=[]).tools is None and chat().tools is None


def test_legacy_functions_are_served_as_tools() -> None:
    legacy = [*ASK, {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
              {"role": "function", "name": "get_weather", "content": "rain"}]

    request = chat(messages=legacy, functions=[WEATHER["function"]], function_call="auto")

    assert request.tools == [WEATHER] and request.messages[2]["name"] == "get_weather"


def _call(name: str, arguments: str = '{"city": "Paris"}', call_id: str = "call_1") -> dict[str, Any]:
    return {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                                                 "function": {"name": name, "arguments": arguments}}]}


BAD_TOOLS = [
    ({"tools": "get_weather"}, "tools", '"tools" must be a list'),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools", 'tool 1 has no "name"'),
    ({"tools": [{"type": "retrieval"}]}, "tools", 'tool 1 must be {"type": "function"'),
    ({"functions": [{"name": "f", "parameters": []}]}, "functions", '"parameters" must be an object'),
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools are given"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "does not force a call"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice",
     "does not force a call"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", '"auto"'),
    ({"tools": [WEATHER], "messages": [*ASK, _call("get_time")]}, "messages[1].tool_calls",
     'calls "get_time", which is not in the request\'s "tools"'),
    ({"tools": [WEATHER], "messages": [*ASK, _call("get_weather", arguments='["Paris"]')]}, "messages[1].tool_calls",
     '"arguments" must be a JSON string naming an object'),
    ({"tools": [WEATHER], "messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages[1].tool_call_id", "which no earlier assistant message made"),
    ({"tools": [WEATHER], "messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id",
     'no "tool_call_id"'),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": _call("get_weather")["tool_calls"]}],
      "tools": [WEATHER]}, "messages[0].tool_calls", "only assistant messages may carry"),
    ({"messages": [*ASK, {"role": "assistant"}]}, "messages[1].content", "must be a string"),
]


@pytest.mark.parametrize(("change", "param", "reason"), BAD_TOOLS, ids=[f"{p}-{i}" for i, (_, p, _) in
                                                                          enumerate(BAD_TOOLS)])
def test_a_bad_tools_field_is_refused_naming_it(change: dict[str, Any], param: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        chat(**change)
    assert refused.value.param == param and reason in str(refused.value), str(refused.value)


def test_tools_are_refused_on_plain_completions() -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_request({"model": "m", "prompt": "x", "tools": [WEATHER]}, kind="completion", limits=LIMITS)
    assert refused.value.param == "tools"
