"""The trainer's own process: `python -m backend.workers.jobs.child <spec.json> <event_fd>`.

It calls run_training with the options in the spec and writes each TrainingEvent, then the TrainResult,
as one JSON line on the pipe `event_fd` (stdout and stderr go to the attempt's log file, where libraries
may print anything). SIGTERM or SIGINT asks the trainer to checkpoint at the next step boundary and stop;
the exit code then is EXIT_STOPPED. Around it, backend/workers/child_entry.py reads the spec and makes the
trainer die with its worker.
"""

from __future__ import annotations

import signal
import threading
import traceback
from dataclasses import asdict
from typing import Any

from backend.training.events import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, TrainingEvent, TrainResult
from backend.workers.child_entry import EventPipe, run_child


def run(spec: dict[str, Any], pipe: EventPipe) -> int:
    """Train with the spec's options; report events and the result on `pipe`; return the exit code."""
    from backend.training.options import TrainingOptions
    from backend.training.trainer import run_training

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        options = TrainingOptions(**spec["options"])
        result = run_training(options, on_event=lambda event: _send_event(pipe, event), stop_requested=stop.is_set)
    except Exception as exc:
        traceback.print_exc()
        result = TrainResult(
            status="failed", output_dir=str(spec["options"].get("output_dir", "")), error_code="error",
            error_message=f"{type(exc).__name__}: {exc}",
        )
    pipe.send({"type": "result", "result": asdict(result)})
    if result.status == "succeeded":
        return EXIT_OK
    return EXIT_STOPPED if result.status == "stopped" else EXIT_FAILED


def _send_event(pipe: EventPipe, event: TrainingEvent) -> None:
    pipe.send({"type": "event", "event": event.to_dict()})


if __name__ == "__main__":
    run_child(run)
