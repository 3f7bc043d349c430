"""Tool-use conversations for rendering: OpenAI's shapes as chat templates take them, and the plain fallback.

The validator (dataset_validation.py) has checked every line already. Here OpenAI's legacy `functions` /
`function_call` / `function` messages become `tools` / `tool_calls` / `tool` messages, and each call's
`arguments` (a JSON string in OpenAI's files) becomes the object Hugging Face chat templates expect.

A template without tools support would drop the tools and the calls silently, so such conversations (and
tokenizers without a template) are rewritten into plain messages instead (the README's "Tool use"):
- the tools go into a system message, `Tools:` and their JSON list (appended to a leading system message);
- an assistant's calls become JSON in its turn: `{"tool_calls": [{"id", "name", "arguments": {...}}]}` on a
  line after its content, if any;
- the answers of consecutive tool messages become one user message,
  `{"tool_results": [{"tool_call_id", "content"}]}`, so user and assistant still alternate.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]


def conversation(messages: list[Message], tools: list[Any] | None, functions: list[Any] | None
                 ) -> tuple[list[Message], list[Message] | None]:
    """Messages and tools in the modern shape: legacy functions as tools, string arguments as objects."""
    declared = [*(tools or []), *({"type": "function", "function": function} for function in functions or [])]
    normalised: list[Message] = []
    legacy_ids: dict[str, str] = {}  # a function's name -> the id given to its latest legacy call
    for message in messages:
        message = {key: value for key, value in message.items() if not (key == "content" and value is None)}
        if "function_call" in message:
            call = message.pop("function_call")
            legacy_ids[call["name"]] = f"call_{len(legacy_ids) + 1}"
            message["tool_calls"] = [{"id": legacy_ids[call["name"]], "type": "function", "function": call}]
        elif message["role"] == "function":
            message = {**message, "role": "tool", "tool_call_id": legacy_ids.get(message.get("name", ""), "")}
        if "tool_calls" in message:
            message["tool_calls"] = [_with_object_arguments(call) for call in message["tool_calls"]]
        normalised.append(message)
    return normalised, declared or None


def _with_object_arguments(call: Message) -> Message:
    function = call["function"]
    arguments = function.get("arguments", "{}")
    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    return {**call, "type": "function", "function": {**function, "arguments": parsed}}


def uses_tools(messages: list[Message], tools: list[Message] | None) -> bool:
    """Whether a normalised conversation declares tools, makes calls or holds a tool's answer."""
    return bool(tools) or any("tool_calls" in message or message["role"] == "tool" for message in messages)


def renders_tools(text: str, messages: list[Message], tools: list[Message] | None) -> bool:
    """Whether a template's rendering kept every tool and call (a template without tools support drops them).

    Tool answers are not looked for: templates render them raw or as JSON strings (quotes escaped).
    """
    names = [tool["function"]["name"] for tool in tools or []]
    names += [call["function"]["name"] for message in messages for call in message.get("tool_calls", [])]
    return all(name in text for name in names)


def plain_messages(messages: list[Message], tools: list[Message] | None) -> list[Message]:
    """The conversation as plain role/content messages (weights kept), for templates without tools support."""
    plain: list[Message] = []
    for message in messages:
        if message["role"] == "tool":
            result = {"tool_call_id": message.get("tool_call_id", ""), "content": message.get("content", "")}
            if plain and plain[-1].get("tool_results") is not None:
                plain[-1]["tool_results"].append(result)
            else:
                plain.append({"role": "user", "tool_results": [result]})
            continue
        plain.append({key: value for key, value in message.items() if key != "tool_calls"})
        if "tool_calls" in message:
            calls = [{"id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"]}
                     for call in message["tool_calls"]]
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            plain[-1]["content"] = f"{message['content']}\n{text}" if message.get("content") else text
    for message in plain:
        if "tool_results" in message:
            message["content"] = json.dumps({"tool_results": message.pop("tool_results")}, ensure_ascii=False)
    return _with_tools_preamble(plain, tools)


def _with_tools_preamble(messages: list[Message], tools: list[Message] | None) -> list[Message]:
    if not tools:
        return messages
    preamble = "Tools:\n" + json.dumps(tools, ensure_ascii=False)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{preamble}"}, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]
