"""Uploads with purpose `evals`: HumanEval-shaped JSONL checked line by line as it streams in.

An upload's purpose may arrive after its bytes (curl sends the form fields in the order given), so every
upload is checked both as a training dataset and as an evaluation file; the purpose then picks the verdict.
Each checker stops at its first bad line, so the one that does not apply costs a line.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.evaluation.harness import EvalDataError, parse_task_line
from backend.training.datasets import DatasetError, DatasetValidator

EVALS_PURPOSE = "evals"
EVALS_FORMAT = "humaneval"
_BOM = b"\xef\xbb\xbf"


class EvalFileValidator:
    """Checks a HumanEval-shaped JSONL stream fed in chunks, holding at most the current line in memory."""

    def __init__(self, *, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.error: EvalDataError | None = None
        self.looks_like_evals = False  # the first object had a task_id: an evaluation file was meant
        self.n_tasks = 0
        self._seen: set[str] = set()
        self._line = 1
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes; a bad line is kept in `error` (nothing raised) and later bytes are ignored."""
        if self.error is not None:
            return
        *lines, tail = chunk.split(b"\n")
        try:
            for raw in lines:
                self._check(bytes(self._buffer) + raw)
                self._buffer.clear()
            if len(self._buffer) + len(tail) > self.max_line_bytes + len(_BOM) + 1:
                raise EvalDataError(f"Line {self._line}: the line is longer than {self.max_line_bytes} bytes")
            self._buffer += tail
        except EvalDataError as error:
            self.error = error
            self._buffer.clear()

    def finish(self) -> int:
        """End of the stream: check the last line; return the number of tasks or raise the first error."""
        if self.error is None and self._buffer:
            try:
                self._check(bytes(self._buffer))
            except EvalDataError as error:
                self.error = error
        if self.error is None and self.n_tasks == 0:
            self.error = EvalDataError("the evaluation file has no tasks")
        if self.error is not None:
            raise self.error
        return self.n_tasks

    def _check(self, raw: bytes) -> None:
        number = self._line
        self._line += 1
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if len(raw.rstrip(b"\r")) > self.max_line_bytes:
            raise EvalDataError(f"Line {number}: the line is longer than {self.max_line_bytes} bytes")
        if number == 1 or self.n_tasks == 0:
            self.looks_like_evals = self.looks_like_evals or b'"task_id"' in raw
        task = parse_task_line(raw, number)
        if task is None:
            return
        if task.task_id in self._seen:
            raise EvalDataError(f"Line {number}: task_id {task.task_id!r} appears twice")
        self._seen.add(task.task_id)
        self.n_tasks += 1


@dataclass
class UploadSummary:
    """What a valid upload holds: its format and how many examples (or tasks)."""

    format: str
    n_examples: int


class UploadValidator:
    """Checks an upload as a training dataset and as an evaluation file at once; refuses once both fail."""

    def __init__(self, *, max_line_bytes: int) -> None:
        self.dataset = DatasetValidator(max_line_bytes=max_line_bytes)
        self.evals = EvalFileValidator(max_line_bytes=max_line_bytes)
        self.dataset_error: DatasetError | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes; raises DatasetError (naming the line) once neither kind of file can be valid."""
        if self.dataset_error is None:
            try:
                self.dataset.feed(chunk)
            except DatasetError as error:
                self.dataset_error = error
        self.evals.feed(chunk)
        if self.dataset_error is not None and self.evals.error is not None:
            raise self._refusal()

    def finish(self, purpose: str | None) -> UploadSummary:
        """The verdict for `purpose`: the summary, or DatasetError naming the first bad line."""
        if purpose == EVALS_PURPOSE:
            try:
                return UploadSummary(EVALS_FORMAT, self.evals.finish())
            except EvalDataError as error:
                raise DatasetError(None, str(error)) from None
        if self.dataset_error is not None:
            raise self.dataset_error
        summary = self.dataset.finish()
        return UploadSummary(summary.format, summary.n_examples)

    def _refusal(self) -> DatasetError:
        if self.evals.looks_like_evals:
            return DatasetError(None, str(self.evals.error))
        assert self.dataset_error is not None
        return self.dataset_error
