"""The trainer's own process: `python -m backend.workers.child <spec.json> <event_fd>`.

It calls run_training with the options in the spec and writes each TrainingEvent, then the TrainResult,
as one JSON line on the pipe `event_fd` (stdout and stderr go to the attempt's log file, where libraries
may print anything). SIGTERM or SIGINT asks the trainer to checkpoint at the next step boundary and stop;
the exit code then is EXIT_STOPPED. It dies with its parent (PR_SET_PDEATHSIG): a worker killed with
SIGKILL must never leave a trainer behind that writes into the folder the job's next attempt resumes from.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from backend.training.events import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, TrainingEvent, TrainResult

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
        try:
            line = json.dumps(payload, default=str, allow_nan=False)
        except ValueError:
            line = _safe_dumps(payload)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def event(self, event: TrainingEvent) -> None:
        self.send({"type": "event", "event": event.to_dict()})

    def result(self, result: TrainResult) -> None:
        self.send({"type": "result", "result": asdict(result)})


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


def run(spec: dict[str, Any], pipe: EventPipe) -> int:
    """Train with the spec's options; report events and the result on `pipe`; return the exit code."""
    from backend.training.options import TrainingOptions
    from backend.training.trainer import run_training

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        options = TrainingOptions(**spec["options"])
        result = run_training(options, on_event=pipe.event, stop_requested=stop.is_set)
    except Exception as exc:
        traceback.print_exc()
        result = TrainResult(
            status="failed", output_dir=str(spec["options"].get("output_dir", "")), error_code="error",
            error_message=f"{type(exc).__name__}: {exc}",
        )
    pipe.result(result)
    if result.status == "succeeded":
        return EXIT_OK
    return EXIT_STOPPED if result.status == "stopped" else EXIT_FAILED


def main(argv: list[str]) -> int:
    """Entry point: argv is [spec_path, event_fd]."""
    spec_path, event_fd = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    die_with_parent(int(spec["parent_pid"]))
    with os.fdopen(int(event_fd), "w", encoding="utf-8", buffering=1) as stream:
        return run(spec, EventPipe(stream))


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is on disk (checkpoints and the adapter are fsynced) and the result is on the pipe: skip the
    # interpreter's teardown of torch, which takes seconds, so the device and the job are released sooner.
    os._exit(code)
