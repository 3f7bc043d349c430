"""Record how an attempt ended: succeeded (with the adapter archive), failed, cancelled, paused or retried."""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.statuses import JobStatus
from backend.services import job_runs
from backend.services.storage import hash_file
from backend.training.events import EXIT_STOPPED
from backend.workers.adapter_archive import archive_adapter
from backend.workers.jobs.recorder import AttemptRecorder, keep_alive
from backend.workers.jobs.runner import TrainerOutcome

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class JobIdentity:
    """What the outcome needs to know about the job besides its attempt."""

    job_id: str
    model: str
    suffix: str | None
    project_name: str


def fine_tuned_model_name(identity: JobIdentity) -> str:
    """`ft:<base>:<suffix or project name>:<job id>`."""
    return f"ft:{identity.model}:{identity.suffix or identity.project_name}:{identity.job_id}"


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None}


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class OutcomeRecorder:
    """Turns a TrainerOutcome into the job's final (or next) state, fenced by the attempt."""

    def __init__(self, identity: JobIdentity, recorder: AttemptRecorder, settings: Settings) -> None:
        self.identity = identity
        self.recorder = recorder
        self.settings = settings

    def finish(self, status: JobStatus, **values: Any) -> None:
        """Record the attempt's final status (fenced), with the job fields in `values`."""
        self.recorder.write(
            lambda s: job_runs.finish(
                session=s, job_id=self.identity.job_id, attempt=self.recorder.attempt, status=status, **values
            )
        )

    def record(self, outcome: TrainerOutcome) -> str:
        """Write the outcome; return the status the job was left in ('requeued' when retried)."""
        result = outcome.result or {}
        if outcome.stop_reason == "stale":
            return "stale"
        if outcome.stop_reason == "cancel":
            self.recorder.message("Job cancelled: the trainer stopped and its device is free")
            self.finish(JobStatus.CANCELLED)
            return JobStatus.CANCELLED
        if outcome.stop_reason == "pause" and result.get("status") != "succeeded":
            if outcome.returncode == EXIT_STOPPED:
                self.recorder.message(f"Job paused at step {result.get('steps', 0)}: resume continues from there")
            else:
                self.recorder.message("Job paused: resume continues from the last complete checkpoint", level="warn")
            self.finish(JobStatus.PAUSED)
            return JobStatus.PAUSED
        if result.get("status") == "succeeded":
            with keep_alive(self.recorder, self.settings.heartbeat_seconds):
                return self.succeed(result)
        if result.get("status") == "failed":
            message = result.get("error_message") or "The trainer failed."
            self.finish(JobStatus.FAILED, error=_error(result.get("error_code") or "error", message))
            return JobStatus.FAILED
        if result.get("status") == "stopped" and outcome.returncode == EXIT_STOPPED:
            return self.handed_back(result)
        return self.crashed(outcome)

    def handed_back(self, result: dict[str, Any]) -> str:
        """The trainer was stopped cleanly without a cancel or pause (its worker is shutting down): requeue it.

        It checkpointed before exiting, so nothing is lost and no attempt counts against max_attempts.
        """
        job_id, attempt = self.identity.job_id, self.recorder.attempt
        self.recorder.message(
            f"The worker is shutting down: the trainer checkpointed at step {result.get('steps', 0)}; the job goes "
            "back to the queue and continues from there", level="warn",
        )
        self.recorder.write(lambda s: job_runs.requeue(session=s, job_id=job_id, attempt=attempt))
        return "requeued"

    def succeed(self, result: dict[str, Any]) -> str:
        """Archive and store the adapter, then mark the job succeeded."""
        identity, attempt = self.identity, self.recorder.attempt
        relative = Path("artifacts") / identity.job_id / f"adapter-attempt-{attempt}.zip"
        destination = self.settings.data_dir / relative
        extra = {"job_id": identity.job_id, "fine_tuned_model": fine_tuned_model_name(identity),
                 "base_model_name": identity.model}
        try:
            archive_adapter(Path(result.get("adapter_dir") or result["output_dir"]), destination, extra_manifest=extra)
            sha256, size = hash_file(destination)
        except OSError as error:
            destination.unlink(missing_ok=True)
            self.finish(JobStatus.FAILED, error=_error("artifact_store_error", f"Could not store the adapter: {error}"))
            return JobStatus.FAILED
        filename = f"{identity.job_id}-adapter.zip"
        file_id = self.recorder.write(
            lambda s: job_runs.store_result_file(
                session=s, job_id=identity.job_id, attempt=attempt, path=str(relative), sha256=sha256, size=size,
                filename=filename,
            )
        )
        self.recorder.message(f"Adapter stored as {file_id} ({size} bytes)", data={"file_id": file_id})
        self.finish(
            JobStatus.SUCCEEDED, fine_tuned_model=fine_tuned_model_name(identity), result_files=[file_id],
            trained_tokens=int(result.get("trained_tokens") or 0),
        )
        return JobStatus.SUCCEEDED

    def crashed(self, outcome: TrainerOutcome) -> str:
        """A trainer that died without a result: retry as the next attempt, or fail once max_attempts are lost."""
        job_id, attempt, cap = self.identity.job_id, self.recorder.attempt, self.settings.max_attempts
        how = f"the trainer crashed ({_exit_description(outcome.returncode)})"
        tail = outcome.log_tail()[-600:]

        def lose(session: Session) -> int:
            job_runs.heartbeat(session=session, job_id=job_id, attempt=attempt)  # the fence, first
            job_runs.record_lost_attempt(session=session, job_id=job_id, attempt=attempt,
                                         reason=f"{how} on attempt {attempt}")
            return job_runs.lost_attempts(session=session, job_id=job_id)

        lost = self.recorder.write(lose)
        if lost < cap:
            self.recorder.message(f"Retrying from the last complete checkpoint ({lost} of {cap} attempts lost)",
                                  level="warn", data={"log_tail": tail} if tail else None)
            self.recorder.write(lambda s: job_runs.requeue(session=s, job_id=job_id, attempt=attempt))
            return "requeued"
        message = f"Gave up after {lost} lost attempts (max_attempts {cap}); last: {how} on attempt {attempt}."
        if tail:
            message += f" Last output: {tail}"
        self.finish(JobStatus.FAILED, error=_error("trainer_crashed", message))
        return JobStatus.FAILED
