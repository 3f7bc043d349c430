"""The checks of one conversation line: roles, content, message weights, tool calls and preference outputs.

Standard library only, like the validator (dataset_validation.py) that calls them on every uploaded line.
"""

from __future__ import annotations

import json
from typing import Any

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
# Tool use: `tool` messages answer `tool_calls`; `function` messages answer the legacy `function_call`.
MESSAGE_ROLES: tuple[str, ...] = (*CHAT_ROLES, "tool", "function")


def json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def quoted(value: object, limit: int = 40) -> str:
    """A value from the file as JSON, cut short: error messages travel back to clients and into the database."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_object(text: str) -> object:
    """The value a JSON string holds, or None when it is not JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _declared_fault(declared: object, key: str, label: str, names: set[str]) -> str | None:
    """The fault in a line's `tools` or legacy `functions` list, adding the names it declares to `names`."""
    if not isinstance(declared, list):
        return f'"{key}" must be a list, not {json_type(declared)}'
    for number, item in enumerate(declared, start=1):
        function = item.get("function") if key == "tools" and isinstance(item, dict) else item
        if key == "tools" and (not isinstance(item, dict) or item.get("type", "function") != "function"):
            return f'{label} {number} must be {{"type": "function", "function": {{"name": ...}}}}'
        if not isinstance(function, dict):
            return f'{label} {number} has no "function" object' if key == "tools" else f"{label} {number} is no object"
        name = function.get("name")
        if not isinstance(name, str) or not name:
            return f'{label} {number} has no "name"'
        if "parameters" in function and not isinstance(function["parameters"], dict):
            return f'{label} {number} "parameters" must be an object, not {json_type(function["parameters"])}'
        names.add(name)
    return None


def uses_tools(record: dict[str, Any]) -> bool:
    """Whether a chat line declares tools or holds a call or a tool's answer (its file is then chat_tools)."""
    if "tools" in record or "functions" in record:
        return True
    messages = record.get("messages")
    return isinstance(messages, list) and any(
        isinstance(message, dict)
        and (message.get("role") in ("tool", "function") or "tool_calls" in message or "function_call" in message)
        for message in messages
    )


class Conversation:
    """One line's messages checked in order: roles, content, weights, and calls against the line's tools."""

    def __init__(self, record: dict[str, Any], *, holder: str = "line") -> None:
        self.holder = holder  # what declares the tools, as faults name it: a file's line, or an API request
        self.tool_names: set[str] = set()
        self.call_ids: set[str] = set()  # tool calls made so far, which `tool` messages may answer
        self.called_functions: set[str] = set()  # legacy function calls made so far
        self.tools_fault: str | None = None
        for key, label in (("tools", "tool"), ("functions", "function")):
            if key in record and self.tools_fault is None:
                self.tools_fault = _declared_fault(record[key], key, label, self.tool_names)

    def fork(self) -> Conversation:
        """A copy to check one alternative continuation with (a preference line's two outputs)."""
        copy = Conversation({}, holder=self.holder)
        copy.tool_names = self.tool_names
        copy.call_ids, copy.called_functions = set(self.call_ids), set(self.called_functions)
        return copy

    def check_messages(self, messages: list[Any], label: str) -> str | None:
        """The first fault among `messages` (named `label 1`, `label 2`, ...), or None."""
        for number, message in enumerate(messages, start=1):
            fault = self.check_message(message, f"{label} {number}")
            if fault:
                return fault
        return None

    def check_message(self, message: object, where: str) -> str | None:
        """The fault of one message (named `where` in the reason), or None."""
        if not isinstance(message, dict):
            return f"{where} is not a JSON object"
        if "role" not in message:
            return f'{where} has no "role"'
        if message["role"] not in MESSAGE_ROLES:
            return f"unknown role {quoted(message['role'])}"
        return _weight_fault(message, where) or _content_fault(message, where) or self._calls_fault(message, where)

    def _calls_fault(self, message: dict[str, Any], where: str) -> str | None:
        role = message["role"]
        for key in ("tool_calls", "function_call"):
            if key in message and role != "assistant":
                return f'{where} has "{key}", which only assistant messages may carry'
        if "tool_calls" in message:
            return self._tool_calls_fault(message["tool_calls"], where)
        if "function_call" in message:
            call = message["function_call"]
            fault = self._call_fault(call, f"{where} function_call")
            if fault is None:
                self.called_functions.add(call["name"])
            return fault
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                return f'{where} has no "tool_call_id"'
            if call_id not in self.call_ids:
                return f"{where} answers tool call {quoted(call_id)}, which no earlier assistant message made"
        if role == "function" and message.get("name") not in self.called_functions:
            return f'{where} answers function {quoted(message.get("name"))}, which no earlier "function_call" called'
        return None

    def _tool_calls_fault(self, calls: object, where: str) -> str | None:
        if not isinstance(calls, list) or not calls:
            return f'{where} "tool_calls" must be a non-empty list'
        for number, call in enumerate(calls, start=1):
            at = f"{where} tool call {number}"
            if not isinstance(call, dict):
                return f"{at} is not a JSON object"
            call_id = call.get("id")
            if not isinstance(call_id, str) or not call_id:
                return f'{at} has no "id"'
            if call_id in self.call_ids:
                return f"{at} repeats the id {quoted(call_id)}"
            if call.get("type", "function") != "function":
                return f'{at} "type" must be "function"'
            fault = self._call_fault(call.get("function"), at)
            if fault:
                return fault
            self.call_ids.add(call_id)
        return None

    def _call_fault(self, function: object, at: str) -> str | None:
        """The fault of one call's {"name", "arguments"}: a declared tool, arguments a JSON object as a string."""
        if not isinstance(function, dict):
            return f'{at} has no "function" object'
        name = function.get("name")
        if not isinstance(name, str) or not name:
            return f'{at} has no function "name"'
        if name not in self.tool_names:
            return f"{at} calls {quoted(name)}, which is not in the {self.holder}'s \"tools\""
        arguments = function.get("arguments")
        if not isinstance(arguments, str) or not isinstance(_json_object(arguments), dict):
            return f'{at} "arguments" must be a JSON string naming an object (got {quoted(arguments)})'
        return None


def _weight_fault(message: dict[str, Any], where: str) -> str | None:
    if "weight" not in message:
        return None
    if message["role"] != "assistant":
        return f'{where} has a "weight", which only assistant messages may carry'
    weight = message["weight"]
    if type(weight) is not int or weight not in (0, 1):
        return f'{where} "weight" must be 0 or 1 (got {quoted(weight)})'
    return None


def _content_fault(message: dict[str, Any], where: str) -> str | None:
    """Content is a string; an assistant message making calls may leave it out or null."""
    calls = message["role"] == "assistant" and ("tool_calls" in message or "function_call" in message)
    if "content" not in message:
        return None if calls else f'{where} has no "content"'
    content = message["content"]
    if content is None and calls:
        return None
    if not isinstance(content, str):
        return f'{where} "content" must be a string, not {json_type(content)}'
    return None


def preference_fault(record: dict[str, Any]) -> str | None:
    """The reason a preference (DPO) record is invalid, or None."""
    source = record.get("input")
    if not isinstance(source, dict):
        return f'"input" must be an object, not {json_type(source)}' if "input" in record else 'missing key "input"'
    messages = source.get("messages")
    if not isinstance(messages, list) or not messages:
        return '"input.messages" must be a non-empty list of messages'
    conversation = Conversation(source)
    fault = conversation.tools_fault or conversation.check_messages(messages, "input message")
    if fault:
        return fault
    if messages[-1]["role"] not in ("user", "tool", "function"):
        return f'"input.messages" must end with a user or tool message (the last is {quoted(messages[-1]["role"])})'
    for key in ("preferred_output", "non_preferred_output"):
        fault = _output_fault(record, key, conversation.fork())
        if fault:
            return fault
    return None


def _output_fault(record: dict[str, Any], key: str, conversation: Conversation) -> str | None:
    """A preference output: a list of exactly one assistant message, its calls naming the input's tools."""
    if key not in record:
        return f'missing key "{key}"'
    output = record[key]
    if not isinstance(output, list) or len(output) != 1:
        return f'"{key}" must be a list of exactly one assistant message'
    message, where = output[0], f"{key} message 1"
    if isinstance(message, dict) and "role" in message and message["role"] != "assistant":
        return f'{where} must be an assistant message (got role {quoted(message["role"])})'
    if isinstance(message, dict) and "weight" in message:
        return f'{where} has a "weight": preference outputs are compared whole, not weighted'
    return conversation.check_message(message, where)


def _chat_fault(record: dict[str, Any]) -> str | None:
    """The reason a chat record is invalid, or None."""
    return chat_check(record)[0]


def chat_check(record: dict[str, Any]) -> tuple[str | None, bool]:
    """The reason a chat record is invalid (or None), and whether it has an assistant turn to train on."""
    messages = record["messages"]
    if not isinstance(messages, list):
        return f'"messages" must be a list, not {json_type(messages)}', False
    if not messages:
        return '"messages" is empty', False
    conversation = Conversation(record)
    fault = conversation.tools_fault or conversation.check_messages(messages, "message")
    if fault:
        return fault, False
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant message (a conversation needs at least one to train on)", False
    return None, any(message["role"] == "assistant" and message.get("weight", 1) == 1 for message in messages)
