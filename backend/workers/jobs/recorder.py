"""Persist what one attempt's trainer reports: events, metrics, progress, checkpoints, telemetry, heartbeats.

Each write is its own short transaction through backend.services.job_runs, fenced by the attempt, so
the API sees progress as it happens and a stale attempt's writes are refused (StaleAttemptError).
A database that is briefly unreachable is waited for: the write is retried until `retry_seconds` pass.
Events and checkpoints carry an id chosen before the first try, so a retry after a commit whose
acknowledgement was lost does not store them twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from backend.db.models import new_id
from backend.services import job_runs
from backend.training.events import DPO_METRICS, TrainingEvent
from backend.workers.supervisor import beating
from backend.workers.writes import with_retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

METRIC_FIELDS = (
    "step", "train_loss", "learning_rate", "tokens_per_second", "gpu_memory_used_bytes", "peak_memory_bytes",
    "epoch", "total_steps",
    # OpenAI's names, those a run has: train_mean_token_accuracy (supervised), valid_* with a validation file
    "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy", "full_valid_loss",
    "full_valid_mean_token_accuracy",
    *DPO_METRICS,  # --method dpo's, in place of a token accuracy
)


class AttemptRecorder:
    """Writes one attempt's reports to SQL; every method returns the job's requested_action."""

    def __init__(self, job_id: str, attempt: int, *, data_dir: Path, retry_seconds: float = 60.0) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.data_dir = data_dir.resolve()
        self.retry_seconds = retry_seconds
        self.peak_bytes: int | None = None
        self.trained_steps: list[tuple[float, int]] = []  # (time, step) for the finish estimate

    def write(self, write: Callable[[Session], T]) -> T:
        """Run one fenced write (retried while the database is unreachable)."""
        return with_retry(write, retry_seconds=self.retry_seconds)

    def heartbeat(self) -> str | None:
        return self.write(lambda s: job_runs.heartbeat(session=s, job_id=self.job_id, attempt=self.attempt))

    def message(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> str | None:
        event_id = new_id("ftevent")  # the same on every retry: a commit whose answer was lost is not repeated
        return self.write(
            lambda s: job_runs.append_event(
                session=s, job_id=self.job_id, attempt=self.attempt, message=message, level=level, data=data,
                event_id=event_id,
            )
        )

    def event(self, event: TrainingEvent) -> str | None:
        """Persist one trainer event by its kind."""
        if event.kind == "metrics":
            return self._metrics(event.data)
        if event.kind == "checkpoint":
            return self._checkpoint(event.data)
        if event.kind == "telemetry":
            return self._telemetry(event.data)
        if event.kind == "plan":
            return self.message(event.message or "Memory plan", level=event.level, data={"plan": event.data})
        return self.message(event.message, level=event.level, data=event.data or None)

    def _note_peak(self, value: Any) -> int | None:
        if isinstance(value, int | float) and value > 0:
            self.peak_bytes = max(self.peak_bytes or 0, int(value))
            return int(value)
        return None

    def _estimated_finish(self, step: int, total: int | None) -> int | None:
        now = time.time()
        self.trained_steps.append((now, step))
        first_time, first_step = self.trained_steps[0]
        if not total or step <= first_step or now <= first_time:
            return None
        seconds_per_step = (now - first_time) / (step - first_step)
        return int(now + seconds_per_step * max(0, total - step))

    def _metrics(self, data: dict[str, Any]) -> str | None:
        step = int(data.get("step") or 0)
        total = data.get("total_steps")
        total_steps = int(total) if isinstance(total, int | float) else None
        peak = self._note_peak(data.get("peak_memory_bytes"))
        finish_at = self._estimated_finish(step, total_steps)
        loss = data.get("train_loss")
        shown_loss = f"{loss:.4f}" if isinstance(loss, int | float) else "nan"
        message = f"Step {step}/{total_steps or '?'}: training loss={shown_loss}"
        payload = {key: data[key] for key in METRIC_FIELDS if key in data}
        epoch = data.get("epoch")
        event_id = new_id("ftevent")

        def write(session: Session) -> str | None:
            job_runs.append_event(
                session=session, job_id=self.job_id, attempt=self.attempt, message=message, type="metrics",
                data=payload, event_id=event_id,
            )
            return job_runs.record_progress(
                session=session, job_id=self.job_id, attempt=self.attempt, step=step, total_steps=total_steps,
                epoch=float(epoch) if isinstance(epoch, int | float) else None, peak_bytes=peak,
                estimated_finish=finish_at,
            )

        return self.write(write)

    def relative_path(self, path: str) -> str:
        """A path under data_dir as stored in SQL (relative), anything else unchanged."""
        try:
            return str(Path(path).resolve().relative_to(self.data_dir))
        except ValueError:
            return path

    def _checkpoint(self, data: dict[str, Any]) -> str | None:
        step = int(data.get("step") or 0)
        path = self.relative_path(str(data.get("path", "")))
        metrics = data.get("metrics") or None
        checkpoint_id, event_id = new_id("ftckpt"), new_id("ftevent")

        def write(session: Session) -> str | None:
            job_runs.record_checkpoint(
                session=session, job_id=self.job_id, attempt=self.attempt, step_number=step, path=path,
                metrics=metrics, checkpoint_id=checkpoint_id,
            )
            return job_runs.append_event(
                session=session, job_id=self.job_id, attempt=self.attempt,
                message=f"Checkpoint saved at step {step}", data={"step": step}, event_id=event_id,
            )

        return self.write(write)

    def _telemetry(self, data: dict[str, Any]) -> str | None:
        peak = self._note_peak(data.get("peak_bytes"))
        step = data.get("step")

        def write(session: Session) -> None:
            job_runs.record_telemetry(
                session=session, job_id=self.job_id, attempt=self.attempt,
                step=int(step) if isinstance(step, int | float) else None, sample=data, peak_bytes=peak,
            )

        self.write(write)
        return None


@contextmanager
def keep_alive(recorder: AttemptRecorder, interval: float) -> Iterator[None]:
    """Heartbeat from a thread while the caller does slow work that writes none (validation, archiving)."""

    def beat() -> bool:
        try:
            recorder.heartbeat()
        except Exception:  # stale or unreachable: the caller's own next write reports it
            logger.warning("job %s: heartbeat failed", recorder.job_id, exc_info=True)
            return False
        return True

    with beating(beat, interval=interval, name=f"heartbeat-{recorder.job_id}"):
        yield
