"""Training and validation JSONL files: the formats, and the validator shared by the API and the trainer.

It needs only the standard library and orjson, so the API can check uploads without importing torch or
transformers. Rendering and tokenization are in datasets.py, which keeps these names importable too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

DatasetFormat = Literal["chat", "chat_tools", "prompt_completion", "text", "instruction", "preference"]
DATASET_FORMATS: tuple[str, ...] = ("chat", "chat_tools", "prompt_completion", "text", "instruction", "preference")
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
# Tool use: `tool` messages answer `tool_calls`; `function` messages answer the legacy `function_call`.
MESSAGE_ROLES: tuple[str, ...] = (*CHAT_ROLES, "tool", "function")
CHAT_FORMATS: tuple[str, ...] = ("chat", "chat_tools")  # lines of both may share a file, which is then chat_tools

DEFAULT_MAX_LINE_BYTES = 1_000_000

_BOM = b"\xef\xbb\xbf"
_READ_CHUNK_BYTES = 1 << 20
# json refuses nesting near 1000 levels (RecursionError, the depth depending on the stack) where orjson
# goes on to 1024, so lines with this many "{" and "[" are left to json: both parsers then agree.
_FAST_MAX_BRACKETS = 512
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"{[")
_SHAPES = '"messages", "prompt"+"completion", "instruction"+"output" or "text"'


class DatasetError(ValueError):
    """A dataset refused: `line` is the 1-based line at fault (None for the whole file), `reason` says why."""

    def __init__(self, line: int | None, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"Line {line}: {reason}" if line is not None else reason)


@dataclass
class DatasetSummary:
    """What a valid dataset holds."""

    format: DatasetFormat
    n_examples: int


# ---------------------------------------------------------------------------------------------------------
# Validation, line by line


def _require_string(record: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    """The reason `record[key]` is not a string (None when it is fine)."""
    if key not in record:
        return None if optional else f'missing key "{key}"'
    if not isinstance(record[key], str):
        return f'"{key}" must be a string, not {_json_type(record[key])}'
    return None


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _quoted(value: object, limit: int = 40) -> str:
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
        return f'"{key}" must be a list, not {_json_type(declared)}'
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
            return f'{label} {number} "parameters" must be an object, not {_json_type(function["parameters"])}'
        names.add(name)
    return None


def _uses_tools(record: dict[str, Any]) -> bool:
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

    def __init__(self, record: dict[str, Any]) -> None:
        self.tool_names: set[str] = set()
        self.call_ids: set[str] = set()  # tool calls made so far, which `tool` messages may answer
        self.called_functions: set[str] = set()  # legacy function calls made so far
        self.tools_fault: str | None = None
        for key, label in (("tools", "tool"), ("functions", "function")):
            if key in record and self.tools_fault is None:
                self.tools_fault = _declared_fault(record[key], key, label, self.tool_names)

    def fork(self) -> Conversation:
        """A copy to check one alternative continuation with (a preference line's two outputs)."""
        copy = Conversation({})
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
            return f"unknown role {_quoted(message['role'])}"
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
                return f"{where} answers tool call {_quoted(call_id)}, which no earlier assistant message made"
        if role == "function" and message.get("name") not in self.called_functions:
            return f'{where} answers function {_quoted(message.get("name"))}, which no earlier "function_call" called'
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
                return f"{at} repeats the id {_quoted(call_id)}"
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
            return f"{at} calls {_quoted(name)}, which is not in the line's \"tools\""
        arguments = function.get("arguments")
        if not isinstance(arguments, str) or not isinstance(_json_object(arguments), dict):
            return f'{at} "arguments" must be a JSON string naming an object (got {_quoted(arguments)})'
        return None


def _weight_fault(message: dict[str, Any], where: str) -> str | None:
    if "weight" not in message:
        return None
    if message["role"] != "assistant":
        return f'{where} has a "weight", which only assistant messages may carry'
    weight = message["weight"]
    if type(weight) is not int or weight not in (0, 1):
        return f'{where} "weight" must be 0 or 1 (got {_quoted(weight)})'
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
        return f'{where} "content" must be a string, not {_json_type(content)}'
    return None


def _preference_fault(record: dict[str, Any]) -> str | None:
    """The reason a preference (DPO) record is invalid, or None."""
    source = record.get("input")
    if not isinstance(source, dict):
        return f'"input" must be an object, not {_json_type(source)}' if "input" in record else 'missing key "input"'
    messages = source.get("messages")
    if not isinstance(messages, list) or not messages:
        return '"input.messages" must be a non-empty list of messages'
    conversation = Conversation(source)
    fault = conversation.tools_fault or conversation.check_messages(messages, "input message")
    if fault:
        return fault
    if messages[-1]["role"] not in ("user", "tool", "function"):
        return f'"input.messages" must end with a user or tool message (the last is {_quoted(messages[-1]["role"])})'
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
        return f'{where} must be an assistant message (got role {_quoted(message["role"])})'
    if isinstance(message, dict) and "weight" in message:
        return f'{where} has a "weight": preference outputs are compared whole, not weighted'
    return conversation.check_message(message, where)


def _chat_fault(record: dict[str, Any]) -> str | None:
    """The reason a chat record is invalid, or None."""
    return _chat_check(record)[0]


def _chat_check(record: dict[str, Any]) -> tuple[str | None, bool]:
    """The reason a chat record is invalid (or None), and whether it has an assistant turn to train on."""
    messages = record["messages"]
    if not isinstance(messages, list):
        return f'"messages" must be a list, not {_json_type(messages)}', False
    if not messages:
        return '"messages" is empty', False
    conversation = Conversation(record)
    fault = conversation.tools_fault or conversation.check_messages(messages, "message")
    if fault:
        return fault, False
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant message (a conversation needs at least one to train on)", False
    return None, any(message["role"] == "assistant" and message.get("weight", 1) == 1 for message in messages)


def _classify(record: object) -> tuple[DatasetFormat, bool]:
    """The format of one parsed line and whether it has a target; raises DatasetError (no line number)."""
    if not isinstance(record, dict):
        raise DatasetError(None, "expected a JSON object")
    fmt: DatasetFormat
    fault: str | None
    trainable = True
    if "messages" in record:
        fault, trainable = _chat_check(record)
        fmt = "chat_tools" if _uses_tools(record) else "chat"
    elif "preferred_output" in record or "non_preferred_output" in record or isinstance(record.get("input"), dict):
        fmt, fault = "preference", _preference_fault(record)
    elif "prompt" in record or "completion" in record:
        fmt = "prompt_completion"
        fault = _require_string(record, "prompt") or _require_string(record, "completion")
    elif "instruction" in record or "output" in record:
        fmt = "instruction"
        fault = (
            _require_string(record, "instruction")
            or _require_string(record, "input", optional=True)
            or _require_string(record, "output")
        )
    elif "text" in record:
        fmt, fault = "text", _require_string(record, "text")
    else:
        keys = ", ".join(_quoted(key) for key in list(record)[:5]) or "none"
        raise DatasetError(None, f"unknown shape: expected keys {_SHAPES} (found {keys})")
    if fault:
        raise DatasetError(None, fault)
    return fmt, trainable


def classify_record(record: object) -> DatasetFormat:
    """The format of one parsed line; raises DatasetError (without a line number) naming the fault."""
    return _classify(record)[0]


def _plain_line_format(raw: bytes) -> DatasetFormat | None:
    """The format of a valid line of a plain shape, found with less work than json + classify_record.

    It only ever accepts: None (bad JSON, a fault, a blank line, anything unusual) sends the line to the
    exact path, which has the final word and the error messages. Only exact JSON types pass.
    """
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    fmt = _plain_format(record)
    if fmt is None or len(raw) < 2 * _FAST_MAX_BRACKETS or _only_known_keys(record, fmt):
        return fmt  # valid JSON opening n brackets is at least 2n bytes long; known keys nest 3 deep at most
    if len(raw.translate(None, _NOT_BRACKETS)) >= _FAST_MAX_BRACKETS:
        return None  # extra keys could nest deeper than json allows
    return fmt


def _plain_format(record: object) -> DatasetFormat | None:
    """The format of a parsed record that classify_record accepts, or None when unsure."""
    if type(record) is not dict:
        return None
    if "messages" in record:
        tools = len(record) > 1 and ("tools" in record or "functions" in record)
        plain = not tools and _plain_chat(record["messages"])
        return "chat" if plain else None
    if "preferred_output" in record or "non_preferred_output" in record or type(record.get("input")) is dict:
        return None  # preference lines take the exact path
    if "prompt" in record or "completion" in record:
        valid = type(record.get("prompt")) is str and type(record.get("completion")) is str
        return "prompt_completion" if valid else None
    if "instruction" in record or "output" in record:
        valid = (
            type(record.get("instruction")) is str
            and type(record.get("output")) is str
            and type(record.get("input", "")) is str
        )
        return "instruction" if valid else None
    return "text" if type(record.get("text")) is str else None


def _only_known_keys(record: dict[str, Any], fmt: DatasetFormat) -> bool:
    """Whether a record _plain_format accepted holds its format's keys alone (so nothing nests deeper)."""
    if fmt == "chat":
        return len(record) == 1  # _plain_chat let through messages of role and content alone
    known = {"prompt_completion": 2, "instruction": 2 + ("input" in record), "text": 1}
    return len(record) == known[fmt]


def _plain_chat(messages: object) -> bool:
    """Whether `messages` is a list of {role, content: str} alone, with known roles and an assistant turn."""
    if type(messages) is not list:
        return False
    assistant = False
    for message in messages:
        # Any other key (a weight, tool calls) sends the line to the exact path, which checks it.
        if type(message) is not dict or len(message) != 2 or type(message.get("content")) is not str:
            return False
        role = message.get("role")
        if role == "assistant":
            assistant = True
        elif role != "user" and role != "system":
            return False
    return assistant


class DatasetValidator:
    """Checks a JSONL byte stream fed in chunks of any size, holding at most the current line in memory."""

    def __init__(
        self,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        on_example: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.max_line_bytes = max_line_bytes
        self.on_example = on_example  # receives each valid example (load_examples keeps them)
        self.format: DatasetFormat | None = None
        self.n_examples = 0
        self.trainable = False  # some line has a target (not every assistant turn has weight 0)
        self._format_line = 0
        self._line = 1  # the line the buffer belongs to
        self._buffer = bytearray()
        self._at_start = True

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the file; raises DatasetError at the first bad line."""
        # One split per chunk, not a search per line: the per-line work left is the parse and the shape check.
        *lines, tail = chunk.split(b"\n")
        if lines:
            if self._buffer:
                self._buffer += lines[0]
                lines[0] = bytes(self._buffer)
                self._buffer.clear()
            self._check_lines(lines)
        if tail:
            size = len(self._buffer) + len(tail)
            self._check_length(size, bytes(self._buffer[:3]) + tail[:3], tail[-1:])
            self._buffer += tail

    def finish(self) -> DatasetSummary:
        """End of the stream: check the last line (if it has no newline) and summarise."""
        if self._buffer:
            self._check_lines([bytes(self._buffer)])
            self._buffer.clear()
        if self.format is None:
            raise DatasetError(None, "the file is empty")
        if not self.trainable:
            raise DatasetError(None, "nothing to train on: every assistant message in the file has weight 0")
        return DatasetSummary(format=self.format, n_examples=self.n_examples)

    def _check_length(self, size: int, first_bytes: bytes, last_byte: bytes) -> None:
        """Refuse the line (or the part of it seen so far) when it is longer than the limit."""
        limit = self.max_line_bytes
        if self._at_start and first_bytes.startswith(_BOM):
            limit += len(_BOM)
        if last_byte == b"\r":
            limit += 1  # a CRLF line ending is not part of the line
        if size > limit:
            raise DatasetError(self._line, f"the line is longer than {self.max_line_bytes} bytes")

    def _check_lines(self, lines: list[bytes]) -> None:
        """Check whole lines (without their newline) in order."""
        # The loop keeps its counters in locals: at a million lines a GiB, every attribute touched per line
        # shows. A line leaves the fast path (for _check_line) unless it is short enough, plain and of the
        # file's format; examples handed to on_example are parsed by json, whose values are the reference.
        fast = self.on_example is None
        limit, fmt, line, examples = self.max_line_bytes, self.format, self._line, self.n_examples
        trainable = self.trainable
        try:
            for raw in lines:
                if fast and fmt is not None and len(raw) <= limit and _plain_line_format(raw) == fmt:
                    examples += 1
                    trainable = True  # a plain line's assistant turns carry no weight: all are targets
                else:
                    self._line, self.n_examples, self.trainable = line, examples, trainable
                    self._check_line(raw)
                    fmt, examples, trainable = self.format, self.n_examples, self.trainable
                line += 1
        finally:
            self._line, self.n_examples, self.trainable = line, examples, trainable

    def _check_line(self, raw: bytes) -> None:
        """Check one whole line at self._line: its length, its JSON, its shape and format."""
        if len(raw) > self.max_line_bytes:  # the limit only grows (BOM, CR), so shorter lines pass
            self._check_length(len(raw), raw[:3], raw[-1:])
        if self._at_start:
            raw = raw.removeprefix(_BOM)  # editors on Windows write one; it is not part of the data
            self._at_start = False
        fmt = _plain_line_format(raw) if self.on_example is None else None
        if fmt is None:
            self._check_line_exactly(raw)  # a fault, a blank line or an unusual record
        else:
            self._record_format(fmt)
            self.n_examples += 1
            self.trainable = True

    def _check_line_exactly(self, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(self._line, f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
        if not text.strip():
            return
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(self._line, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise DatasetError(self._line, "invalid JSON: nested too deeply") from None
        try:
            fmt, trainable = _classify(record)
        except DatasetError as exc:
            raise DatasetError(self._line, exc.reason) from None
        self._record_format(fmt)
        self.n_examples += 1
        self.trainable = self.trainable or trainable
        if self.on_example is not None:
            self.on_example(record)

    def _record_format(self, fmt: DatasetFormat) -> None:
        if self.format is None:
            self.format, self._format_line = fmt, self._line
        elif fmt in CHAT_FORMATS and self.format in CHAT_FORMATS:
            self.format = "chat_tools" if "chat_tools" in (fmt, self.format) else "chat"
        elif fmt != self.format:
            raise DatasetError(
                self._line,
                f'this line is "{fmt}" but the file is "{self.format}" (from line {self._format_line}); '
                "one file holds one format",
            )


def validate_file(path: str | Path, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> DatasetSummary:
    """Validate a JSONL file, reading it in chunks; raises DatasetError naming the first bad line."""
    return _read_through(DatasetValidator(max_line_bytes=max_line_bytes), path)


def load_examples(
    path: str | Path, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[DatasetFormat, list[dict[str, Any]]]:
    """Validate a JSONL file and return its format and examples."""
    examples: list[dict[str, Any]] = []
    validator = DatasetValidator(max_line_bytes=max_line_bytes, on_example=examples.append)
    summary = _read_through(validator, path)
    return summary.format, examples


def _read_through(validator: DatasetValidator, path: str | Path) -> DatasetSummary:
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_CHUNK_BYTES):
            validator.feed(chunk)
    return validator.finish()
