"""Training datasets: the JSONL validator shared by the API and the trainer, and rendering and tokenization.

The validator needs only the standard library and orjson, so the API can check uploads without importing torch
or transformers; those load only when a tokenizer is used or a batch is collated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DatasetFormat = Literal["chat", "prompt_completion", "text", "instruction"]
DATASET_FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "text", "instruction")
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")

BUILTIN_DATASET: Path = Path(__file__).with_name("builtin_dataset.jsonl")
DEFAULT_MAX_LINE_BYTES = 1_000_000
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips

_BOM = b"\xef\xbb\xbf"
_READ_CHUNK_BYTES = 1 << 20
# json refuses nesting near 1000 levels (RecursionError, the depth depending on the stack) where orjson
# goes on to 1024, so lines with this many "{" and "[" are left to json: both parsers then agree.
_FAST_MAX_BRACKETS = 512
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"{[")
_SHAPES = '"messages", "prompt"+"completion", "instruction"+"output" or "text"'

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


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


def _chat_fault(record: dict[str, Any]) -> str | None:
    """The reason a chat record is invalid, or None."""
    messages = record["messages"]
    if not isinstance(messages, list):
        return f'"messages" must be a list, not {_json_type(messages)}'
    if not messages:
        return '"messages" is empty'
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"message {number} is not a JSON object"
        if "role" not in message:
            return f'message {number} has no "role"'
        if message["role"] not in CHAT_ROLES:
            return f"unknown role {_quoted(message['role'])}"
        if "content" not in message:
            return f'message {number} has no "content"'
        if not isinstance(message["content"], str):
            return f'message {number} "content" must be a string, not {_json_type(message["content"])}'
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant message (a conversation needs at least one to train on)"
    return None


def classify_record(record: object) -> DatasetFormat:
    """The format of one parsed line; raises DatasetError (without a line number) naming the fault."""
    if not isinstance(record, dict):
        raise DatasetError(None, "expected a JSON object")
    fmt: DatasetFormat
    fault: str | None
    if "messages" in record:
        fmt, fault = "chat", _chat_fault(record)
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
    return fmt


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
        return "chat" if _plain_chat(record["messages"]) else None
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
        return len(record) == 1 and all(len(message) == 2 for message in record["messages"])
    known = {"prompt_completion": 2, "instruction": 2 + ("input" in record), "text": 1}
    return len(record) == known[fmt]


def _plain_chat(messages: object) -> bool:
    """Whether `messages` is a list of {role, content: str} with known roles and an assistant turn."""
    if type(messages) is not list:
        return False
    assistant = False
    for message in messages:
        if type(message) is not dict or type(message.get("content")) is not str:
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
        try:
            for raw in lines:
                if fast and fmt is not None and len(raw) <= limit and _plain_line_format(raw) == fmt:
                    examples += 1
                else:
                    self._line, self.n_examples = line, examples
                    self._check_line(raw)
                    fmt, examples = self.format, self.n_examples
                line += 1
        finally:
            self._line, self.n_examples = line, examples

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
            fmt = classify_record(record)
        except DatasetError as exc:
            raise DatasetError(self._line, exc.reason) from None
        self._record_format(fmt)
        self.n_examples += 1
        if self.on_example is not None:
            self.on_example(record)

    def _record_format(self, fmt: DatasetFormat) -> None:
        if self.format is None:
            self.format, self._format_line = fmt, self._line
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


# ---------------------------------------------------------------------------------------------------------
# Rendering: each example becomes text pieces, each marked trainable or not

Segments = list[tuple[str, bool]]


def render_segments(example: dict[str, Any], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase) -> Segments:
    """Text pieces of one example and whether each is trained on (completions, assistant turns), eos last."""
    if fmt == "chat":
        if getattr(tokenizer, "chat_template", None):
            segments = _chat_template_segments(example["messages"], tokenizer)
        else:
            segments = _bos_segments(tokenizer) + _fallback_chat_segments(example["messages"])
    elif fmt == "prompt_completion":
        segments = _bos_segments(tokenizer) + [(example["prompt"], False), (example["completion"], True)]
    elif fmt == "instruction":
        template = ALPACA_PROMPT_WITH_INPUT if example.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=example["instruction"], input=example.get("input", ""))
        segments = _bos_segments(tokenizer) + [(prompt, False), (example["output"], True)]
    elif fmt == "text":
        segments = _bos_segments(tokenizer) + [(example["text"], True)]
    else:
        raise ValueError(f"unknown dataset format {fmt!r}: choose one of {', '.join(DATASET_FORMATS)}")
    return _with_eos([piece for piece in segments if piece[0]], tokenizer)


def _with_eos(segments: Segments, tokenizer: PreTrainedTokenizerBase) -> Segments:
    """Append eos (trained like the piece before it) unless the example already ends with it."""
    eos = tokenizer.eos_token
    if not eos or not segments or "".join(text for text, _ in segments).rstrip().endswith(eos):
        return segments
    return [*segments, (eos, segments[-1][1])]


def _bos_segments(tokenizer: PreTrainedTokenizerBase) -> Segments:
    """A leading bos piece for tokenizers that add one by default (Llama, Mistral); chat templates add their own."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or not tokenizer.bos_token:
        return []
    with_specials = tokenizer("a")["input_ids"]
    adds_bos = bool(with_specials) and with_specials[0] == bos_id
    return [(tokenizer.bos_token, False)] if adds_bos else []


def _fallback_chat_segments(messages: list[dict[str, str]]) -> Segments:
    """The plain template for tokenizers without one: `<|role|>\\ncontent\\n` per message."""
    segments: Segments = []
    for message in messages:
        header = f"<|{message['role']}|>\n"
        if message["role"] == "assistant":
            segments += [(header, False), (message["content"] + "\n", True)]
        else:
            segments.append((header + message["content"] + "\n", False))
    return segments


def _apply_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool
) -> str:
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate") from the model's template
        raise DatasetError(None, f"the model's chat template refused this conversation: {exc}") from None
    return str(rendered)


def _chat_template_segments(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Segments:
    """Render through the tokenizer's template; assistant turns are told apart by rendering prefixes."""
    full = _apply_template(tokenizer, messages, generation_prompt=False)
    segments: Segments = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:  # templates refuse an empty conversation, so there is no prefix to render
            return _search_segments(full, messages, tokenizer)
        head = _apply_template(tokenizer, messages[:index], generation_prompt=True)
        turn = _apply_template(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (head.startswith(done) and turn.startswith(head) and full.startswith(turn)):
            # This template rewrites earlier turns (e.g. drops reasoning): find the answers in the full text.
            return _search_segments(full, messages, tokenizer)
        segments += [(head[len(done) :], False), (turn[len(head) :], True)]
        done = turn
    segments.append((full[len(done) :], False))
    return segments


def _search_segments(full: str, messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Segments:
    """Mark each assistant content (and an eos right after it) as trained, found in order in the rendered text."""
    segments: Segments = []
    cursor = 0
    eos = tokenizer.eos_token or ""
    for message in messages:
        content = message["content"]
        found = full.find(content, cursor) if message["role"] == "assistant" and content else -1
        if found < 0:
            continue
        end = found + len(content)
        if eos and full.startswith(eos, end):
            end += len(eos)
        segments += [(full[cursor:found], False), (full[found:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return segments


# ---------------------------------------------------------------------------------------------------------
# Tokenization, packing and batches


@dataclass
class TokenizedExample:
    """Token ids and labels (IGNORE_INDEX where the loss is not taken) of one example or packed block."""

    input_ids: list[int]
    labels: list[int]


def tokenize_segments(segments: Segments, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[bool]]:
    """Token ids of the joined text and, for each token, whether it falls in a trained piece."""
    text = "".join(piece for piece, _ in segments)
    if not tokenizer.is_fast:  # no offsets: tokenize piece by piece
        ids: list[int] = []
        trained: list[bool] = []
        for piece, is_trained in segments:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            trained += [is_trained] * len(piece_ids)
        return ids, trained
    # One pass over the whole text tokenizes exactly as inference will; offsets map tokens back to pieces.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    char_trained = [is_trained for piece, is_trained in segments for _ in piece]
    trained = [_token_trained(start, end, char_trained) for start, end in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), trained


def _token_trained(start: int, end: int, char_trained: list[bool]) -> bool:
    """A token is trained when any of its characters is (a token may straddle the prompt/answer boundary)."""
    if end <= start:  # trimmed or zero-width offsets: go by the position
        return start < len(char_trained) and char_trained[start]
    return any(char_trained[start:end])


def tokenize_examples(
    examples: Iterable[dict[str, Any]],
    fmt: DatasetFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    train_on_completions_only: bool = False,
    packing: bool = False,
) -> list[TokenizedExample]:
    """Tokenize for causal-LM training: truncate to max_seq_length, or pack into blocks of that length.

    With train_on_completions_only, prompt/user/system tokens get IGNORE_INDEX labels. Examples or blocks
    left with no trained token (a prompt longer than max_seq_length) are dropped: they would give no loss.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be at least 1, got {max_seq_length}")
    tokenized = [
        _labelled(ids, trained, train_on_completions_only)
        for ids, trained in _encoded(examples, fmt, tokenizer)
    ]
    if packing:
        return _pack(tokenized, max_seq_length)
    truncated = (TokenizedExample(t.input_ids[:max_seq_length], t.labels[:max_seq_length]) for t in tokenized)
    return [example for example in truncated if _has_target(example)]


def _encoded(
    examples: Iterable[dict[str, Any]], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase
) -> Iterable[tuple[list[int], list[bool]]]:
    for number, example in enumerate(examples, start=1):
        try:
            segments = render_segments(example, fmt, tokenizer)
        except DatasetError as exc:
            raise DatasetError(None, f"example {number}: {exc.reason}") from None
        yield tokenize_segments(segments, tokenizer)


def _labelled(ids: list[int], trained: list[bool], completions_only: bool) -> TokenizedExample:
    if not completions_only:
        return TokenizedExample(ids, list(ids))
    return TokenizedExample(ids, [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained, strict=True)])


def _has_target(example: TokenizedExample) -> bool:
    # Label 0 is never predicted (the model shifts labels by one), so a block needs a trained token after it.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def _pack(tokenized: list[TokenizedExample], block: int) -> list[TokenizedExample]:
    """Concatenate all examples (each ends in eos) and cut the stream into blocks; the last may be shorter."""
    ids = [tok for example in tokenized for tok in example.input_ids]
    labels = [label for example in tokenized for label in example.labels]
    blocks = (TokenizedExample(ids[i : i + block], labels[i : i + block]) for i in range(0, len(ids), block))
    return [b for b in blocks if _has_target(b)]


def collate(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids, attention_mask and labels (IGNORE_INDEX on padding) tensors."""
    import torch  # here, not at the top: the API validates uploads without loading torch

    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_length_stats(
    examples: Iterable[dict[str, Any]], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int
) -> dict[str, int | float]:
    """Token counts before truncation: n_examples, max_tokens, mean_tokens, total_tokens, n_truncated."""
    lengths = [len(ids) for ids, _ in _encoded(examples, fmt, tokenizer)]
    return {
        "n_examples": len(lengths),
        "max_tokens": max(lengths, default=0),
        "mean_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
        "total_tokens": sum(lengths),
        "n_truncated": sum(length > max_seq_length for length in lengths),
    }
