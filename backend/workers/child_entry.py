"""The child side of the supervisor: what every leased-work child process runs around its own work.

A child is started as `python -m <module> <spec.json> <event_fd>`; its module calls `run_child(run)`, which
reads the spec, makes the process die with its parent (PR_SET_PDEATHSIG: a worker killed with SIGKILL must
never leave a child behind that writes into the folder the next attempt uses), hands `run` a pipe that
writes one JSON object a line, and exits with `run`'s code.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from backend.training.events import EXIT_FAILED

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(EXIT_FAILED)


class EventPipe:
    """One JSON object a line on the pipe to the worker; writes from any thread are serialised."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, payload: dict[str, Any]) -> None:
        """Write `payload` as one line (NaN and infinities as null)."""
        try:
            line = json.dumps(payload, default=str, allow_nan=False)
        except ValueError:
            line = _safe_dumps(payload)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _safe_dumps(payload: dict[str, Any]) -> str:
    """JSON with NaN/inf replaced by null (a diverged loss), so the worker's strict parser accepts it."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        return value

    return json.dumps(clean(payload), default=str)


def main(argv: list[str], run: Callable[[dict[str, Any], EventPipe], int]) -> int:
    """argv is [spec_path, event_fd]: run `run` on the spec with the pipe; return its exit code."""
    spec_path, event_fd = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    die_with_parent(int(spec["parent_pid"]))
    with os.fdopen(int(event_fd), "w", encoding="utf-8", buffering=1) as stream:
        return run(spec, EventPipe(stream))


def run_child(run: Callable[[dict[str, Any], EventPipe], int]) -> NoReturn:
    """The whole child process: `main` on sys.argv, then exit at once."""
    code = main(sys.argv[1:], run)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is on disk (checkpoints and adapters are fsynced) and the result is on the pipe: skip the
    # interpreter's teardown of torch, which takes seconds, so the device and the row are released sooner.
    os._exit(code)
