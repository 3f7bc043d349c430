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

from backend.training.conversations import (
    chat_check,
    json_type,
    preference_fault,
    quoted,
    uses_tools,
)

DatasetFormat = Literal["chat", "chat_tools", "prompt_completion", "text", "instruction", "preference"]
DATASET_FORMATS: tuple[str, ...] = ("chat", "chat_tools", "prompt_completion", "text", "instruction", "preference")
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
        return f'"{key}" must be a string, not {json_type(record[key])}'
    return None


def _classify(record: object) -> tuple[DatasetFormat, bool]:
    """The format of one parsed line and whether it has a target; raises DatasetError (no line number)."""
    if not isinstance(record, dict):
        raise DatasetError(None, "expected a JSON object")
    fmt: DatasetFormat
    fault: str | None
    trainable = True
    if "messages" in record:
        fault, trainable = chat_check(record)
        fmt = "chat_tools" if uses_tools(record) else "chat"
    elif "preferred_output" in record or "non_preferred_output" in record or isinstance(record.get("input"), dict):
        fmt, fault = "preference", preference_fault(record)
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
        keys = ", ".join(quoted(key) for key in list(record)[:5]) or "none"
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
