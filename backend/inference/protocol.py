"""OpenAI-shaped chat and completion requests, checked the same way by the API and the engine, and the answers.

A bad field is an InvalidRequest naming it (`param`), so the API answers 400 before anything reaches an engine.
Chat requests may declare `tools` (or legacy `functions`) and carry a tool conversation (assistant `tool_calls`,
`tool` messages): checked as training checks a tool-use line (conversations.Conversation), and rendered as
training rendered it (rendering.chat_prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from backend.inference.tool_calls import ParsedAnswer, parse_answer
from backend.services.errors import InvalidRequest
from backend.training.conversations import MESSAGE_ROLES, Conversation, quoted

RequestKind = Literal["chat", "completion"]
MAX_STOP_SEQUENCES = 4
# Fields OpenAI defines that safetrain does not serve: refused rather than silently ignored.
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias")
# A message's tool-use fields, kept for the template (content, role and weight-free otherwise).
_TOOL_FIELDS = ("tool_calls", "tool_call_id", "function_call", "name")
# The tools are in the prompt and the model decides whether to call one; forcing a call ("required", a named
# function) needs constrained decoding, which the embedded engine does not do: refused, not ignored.
_FREE_TOOL_CHOICES = ("auto", "none")


@dataclass(frozen=True)
class Limits:
    """The caps a deployment sets (SAFETRAIN_INFERENCE_MAX_TOKENS, SAFETRAIN_INFERENCE_MAX_N)."""

    max_tokens: int
    max_n: int


@dataclass
class Sampling:
    """How to pick the tokens of one request."""

    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One checked request: the model, what to continue (messages or a prompt) and how."""

    kind: RequestKind
    model: str
    messages: list[dict[str, Any]] | None
    prompt: str | None
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    tools: list[dict[str, Any]] | None = None  # OpenAI's `tools`, legacy `functions` among them as tools
    calls_tools: bool = False  # tools were declared and `tool_choice` is not "none": the answer's calls are read
    legacy_functions: bool = False  # declared as `functions`: a call is answered as `function_call`

    @property
    def tool_names(self) -> set[str]:
        """The names a call in the answer may use."""
        return {tool["function"]["name"] for tool in self.tools or []}

    @property
    def input_param(self) -> str:
        """The field that holds the input, for errors about its length."""
        return "messages" if self.kind == "chat" else "prompt"


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer (got {value!r:.40}).", name)
    return value


def _number(
    body: dict[str, Any], name: str, default: float, low: float, high: float, *, open_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise _bad(f"{name} must be a number in {bracket}{low:g}, {high:g}] (got {value!r:.40}).", name)
    return float(value)


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": …}, …]: the text parts joined
        if all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
               for part in content):
            return "".join(part["text"] for part in content)
        raise _bad(f"messages[{index}].content: only text parts are supported.", f"messages[{index}].content")
    if not isinstance(content, str):
        raise _bad(f"messages[{index}].content must be a string.", f"messages[{index}].content")
    return content


def _messages(body: dict[str, Any], conversation: Conversation) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects.", "messages")
    return [_message(message, index, conversation) for index, message in enumerate(messages)]


def _message(message: Any, index: int, conversation: Conversation) -> dict[str, Any]:
    """One message with its content as text; its calls checked against the declared tools and earlier calls."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object with role and content.", where)
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)} (got {role!r:.40}).", f"{where}.role")
    checked: dict[str, Any] = {"role": role}
    checked |= {key: message[key] for key in _TOOL_FIELDS if message.get(key) not in (None, [])}
    calls = role == "assistant" and ("tool_calls" in checked or "function_call" in checked)
    if message.get("content") is not None or not calls:  # a message making calls may have no content
        checked["content"] = _content(message, index)
    fault = conversation.check_message(checked, where)
    if fault:
        raise _bad(f"{fault}.", _tool_param(checked, where))
    return checked


def _tool_param(message: dict[str, Any], where: str) -> str:
    """The field a tool-use fault is in: the calls, or what a tool or function answer names."""
    for key in ("tool_calls", "function_call"):
        if key in message:
            return f"{where}.{key}"
    return {"tool": f"{where}.tool_call_id", "function": f"{where}.name"}.get(message["role"], where)


@dataclass
class _Tools:
    declared: list[dict[str, Any]] | None
    conversation: Conversation
    calls_tools: bool
    legacy_functions: bool


def _tools(body: dict[str, Any], kind: RequestKind) -> _Tools:
    """The declared tools (legacy `functions` as tools), checked as a training line's are, and their checker."""
    declared = {key: body[key] for key in ("tools", "functions") if body.get(key) is not None and body[key] != []}
    for key, value in declared.items():
        if kind != "chat":
            raise _bad(f"{key} is only for chat completions.", key)
        fault = Conversation({key: value}, holder="request").tools_fault
        if fault:
            raise _bad(f"{key}: {fault}.", key)
    for key, over in (("tool_choice", "tools"), ("function_call", "functions")):
        choice = body.get(key)
        if choice is not None and over not in declared:
            raise _bad(f"{key} is only allowed when {over} are given.", key)
        if choice is not None and choice not in _FREE_TOOL_CHOICES:
            raise _bad(f"{key} {quoted(choice)} is not supported: safetrain's inference does not force a call; "
                       'give "auto" (the model decides) or "none".', key)
    tools = [*declared.get("tools", []), *({"type": "function", "function": f} for f in declared.get("functions", []))]
    choice = body.get("tool_choice") if "tools" in declared else body.get("function_call")
    return _Tools(tools or None, Conversation(declared, holder="request"), calls_tools=bool(tools) and choice != "none",
                  legacy_functions="functions" in declared and "tools" not in declared)


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string (one prompt a request).", "prompt")
    return prompt


def _max_tokens(body: dict[str, Any], limits: Limits) -> tuple[int | None, str]:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _integer(body, name)
    if value is not None and not 1 <= value <= limits.max_tokens:
        raise _bad(f"{name} must be between 1 and {limits.max_tokens} (got {value}).", name)
    return value, name


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(item, str) and item for item in stops)):
        raise _bad(f"stop must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them.", "stop")
    return list(stops)


def _sampling(body: dict[str, Any], limits: Limits) -> Sampling:
    max_tokens, max_tokens_param = _max_tokens(body, limits)
    n = _integer(body, "n")
    if n is not None and not 1 <= n <= limits.max_n:
        raise _bad(f"n must be between 1 and {limits.max_n} (got {n}).", "n")
    return Sampling(
        max_tokens=max_tokens, max_tokens_param=max_tokens_param,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        n=n or 1, stop=_stop(body), seed=_integer(body, "seed"),
    )


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _bad("stream_options is only allowed with stream: true.", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options must be {\"include_usage\": bool}.", "stream_options")
    return stream, bool(options.get("include_usage"))


def parse_request(body: Any, *, kind: RequestKind, limits: Limits) -> GenerationRequest:
    """The checked request; InvalidRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_value")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be the name of a model (see GET /v1/models).", "model")
    for name in _UNSUPPORTED:
        if body.get(name):
            raise _bad(f"{name} is not supported by safetrain's inference.", name)
    tools = _tools(body, kind)
    messages = _messages(body, tools.conversation) if kind == "chat" else None
    prompt = _prompt(body) if kind == "completion" else None
    stream, include_usage = _streaming(body)
    return GenerationRequest(kind=kind, model=model, messages=messages, prompt=prompt,
                             sampling=_sampling(body, limits), stream=stream, include_usage=include_usage,
                             tools=tools.declared, calls_tools=tools.calls_tools,
                             legacy_functions=tools.legacy_functions)


# Answers.


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(
    request: GenerationRequest, *, response_id: str, texts: list[str], finish_reasons: list[str], used: dict[str, int]
) -> dict[str, Any]:
    """The whole answer: a ChatCompletion (the calls in it read where tools were declared) or a Completion."""
    created = int(time.time())
    if request.kind == "chat":
        choices = [_chat_choice(request, i, text, reason)
                   for i, (text, reason) in enumerate(zip(texts, finish_reasons, strict=True))]
        return {"id": response_id, "object": "chat.completion", "created": created, "model": request.model,
                "choices": choices, "usage": used}
    choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
               for i, (text, reason) in enumerate(zip(texts, finish_reasons, strict=True))]
    return {"id": response_id, "object": "text_completion", "created": created, "model": request.model,
            "choices": choices, "usage": used}


def _chat_choice(request: GenerationRequest, index: int, text: str, reason: str) -> dict[str, Any]:
    parsed = parse_answer(text, request.tool_names) if request.calls_tools else None
    message: dict[str, Any] = {"role": "assistant", "content": text if parsed is None else parsed.content}
    if parsed is not None:
        message |= call_fields(request, parsed.tool_calls)
    return {"index": index, "message": message, "finish_reason": call_finish_reason(request, reason, parsed),
            "logprobs": None}


def call_fields(request: GenerationRequest, calls: list[dict[str, Any]], *, streamed: bool = False) -> dict[str, Any]:
    """A message's (or a delta's) calls: `tool_calls`, or the first call as `function_call` for legacy functions."""
    if request.legacy_functions:
        return {"function_call": calls[0]["function"]}
    if streamed:
        return {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
    return {"tool_calls": calls}


def call_finish_reason(request: GenerationRequest, reason: str, parsed: ParsedAnswer | None) -> str:
    """OpenAI's reason for an answer that calls tools; a length cut stays `length`."""
    if parsed is None or reason == "length":
        return reason
    return "function_call" if request.legacy_functions else "tool_calls"


def chunk_object(
    request: GenerationRequest, *, response_id: str, created: int, index: int | None = None, text: str | None = None,
    finish_reason: str | None = None, first: bool = False, used: dict[str, int] | None = None,
    calls: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a delta of choice `index` (text, or `calls` from call_fields), or (index None) the
    closing usage chunk with no choices."""
    base: dict[str, Any] = {"id": response_id, "created": created, "model": request.model}
    if request.kind == "chat":
        base["object"] = "chat.completion.chunk"
        choices = []
        if index is not None:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            if calls:
                delta |= {"content": None, **calls} if first else calls
            choices = [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    else:
        base["object"] = "text_completion"
        choices = ([{"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
                   if index is not None else [])
    base["choices"] = choices
    if request.include_usage:
        base["usage"] = used  # null on every chunk but the last, as OpenAI streams it
    return base
