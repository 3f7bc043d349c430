"""Run the trainer of one job attempt under the supervisor and persist what it reports as it comes.

The child is `python -m backend.workers.jobs.child`; its events go through the attempt's recorder (every
write fenced, every write returning the job's requested_action, so a cancel or pause stops the trainer at
its next step boundary: it checkpoints and exits 75).
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.devices import Device
from backend.training.events import TrainingEvent
from backend.workers.jobs.recorder import AttemptRecorder
from backend.workers.supervisor import ChildExit, ChildSpec, Supervisor

CHILD_MODULE = "backend.workers.jobs.child"
LOG_TAIL_CHARS = 2000


@dataclass
class TrainerOutcome:
    """How the child ended: its exit code, its TrainResult (as a dict) if it sent one, and why it stopped."""

    returncode: int
    result: dict[str, Any] | None
    stop_reason: str | None  # "cancel", "pause", "stale" or None
    pid: int
    log_path: Path
    peak_bytes: int | None = None

    def log_tail(self) -> str:
        """The end of the trainer's log."""
        return ChildExit(self.returncode, self.stop_reason, self.pid, self.log_path).log_tail(LOG_TAIL_CHARS)


def stop_trainers() -> list[int]:
    """SIGTERM every trainer below this process (a worker shutting down): each checkpoints and exits 75."""
    import psutil

    stopped = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if CHILD_MODULE in process.cmdline():
                process.send_signal(signal.SIGTERM)
                stopped.append(process.pid)
    return stopped


def run_trainer(
    *,
    spec: dict[str, Any],
    work_dir: Path,
    device: Device,
    recorder: AttemptRecorder,
    heartbeat_seconds: float,
    stop_grace_seconds: float = 120.0,
    allow_hub: bool = False,
) -> TrainerOutcome:
    """Spawn the trainer for `spec` on `device` and persist its reports until it exits."""
    result: dict[str, Any] = {}

    def handle_line(payload: dict[str, Any]) -> str | None:
        if payload.get("type") == "result":
            result["result"] = payload.get("result")
        elif payload.get("type") == "event":
            return recorder.event(TrainingEvent.from_dict(payload["event"]))
        return None

    # The worker's own files go in a subfolder: the work folder's top level is the adapter the job archives.
    child = ChildSpec(module=CHILD_MODULE, spec=spec, folder=work_dir / "worker", attempt=recorder.attempt,
                      device=device, allow_hub=allow_hub)
    supervisor = Supervisor(
        child, handle_line=handle_line, heartbeat=recorder.heartbeat, heartbeat_seconds=heartbeat_seconds,
        stop_grace_seconds=stop_grace_seconds, label=f"job {recorder.job_id} attempt {recorder.attempt}",
    )
    pid = supervisor.process.pid
    started = f"Trainer started (pid {pid}) on {device.label}"
    ended = supervisor.wait(lambda: recorder.message(started, data={"pid": pid}))
    return TrainerOutcome(returncode=ended.returncode, result=result.get("result"), stop_reason=ended.stop_reason,
                          pid=ended.pid, log_path=ended.log_path, peak_bytes=recorder.peak_bytes)
