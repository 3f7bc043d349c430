"""The worker's SQL writes for one job attempt, every one fenced by (job_id, attempt) through the lease.

A job is leased work (backend/services/lease.py): a worker claims a queued job as its next attempt, and every
write it makes afterwards first updates the job row under the fence `status IN (validating_files, running)`;
a stale attempt's write raises StaleAttemptError. The reconciler's writes (expire a silent attempt, re-send a
lost message) are at the end, with the rule for what a silent attempt becomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from backend.db.fence import silent_for
from backend.db.models import Artifact, Checkpoint, File, Job, JobEvent, Project, TelemetrySample, now
from backend.db.statuses import JobStatus
from backend.services import lease
from backend.services.lease import LeaseKind

ACTIVE_RUN_STATUSES = (JobStatus.VALIDATING_FILES, JobStatus.RUNNING)
# The message of every event that records an attempt lost to a crash or a dead worker: counting them
# gives the job's losses, which max_attempts caps (pauses and resumes raise `attempt` but lose nothing).
LOST_ATTEMPT_PREFIX = "Attempt lost: "
RESULT_FILE_PURPOSE = "fine-tune-results"
RUN_JOB = "safetrain.run_job"


def _queued() -> ColumnElement[bool]:
    return Job.status == JobStatus.QUEUED


def _sent_before(seconds: int) -> ColumnElement[bool]:
    # A queued job's heartbeat_at is when its message was last sent (by a requeue or a re-send); before
    # that, its creation time.
    return silent_for(func.coalesce(Job.heartbeat_at, Job.created_at), seconds)


@dataclass(frozen=True)
class ClaimedJob:
    """What a successful claim hands the worker."""

    job_id: str
    attempt: int
    requested_action: str | None


def _fenced_update(session: Session, job_id: str, attempt: int, **values: Any) -> str | None:
    """Update the job row under the fence; return its requested_action, or raise StaleAttemptError."""
    action: str | None = lease.fenced_update(session, JOBS, job_id, attempt, returning=Job.requested_action,
                                             **values)
    return action


def claim_job(*, session: Session, job_id: str, worker: str) -> ClaimedJob | None:
    """Take a queued job for this worker as its next attempt; None when it is gone, finished or taken."""
    row = lease.claim(
        session, JOBS, job_id, worker=worker, claimable=_queued(), status=JobStatus.VALIDATING_FILES,
        returning=(Job.requested_action,), started_at=func.coalesce(Job.started_at, now()),
    )
    if row is None:
        return None
    return ClaimedJob(job_id=job_id, attempt=int(row[0]), requested_action=row[1])


def heartbeat(*, session: Session, job_id: str, attempt: int) -> str | None:
    """Mark the attempt alive; return the job's requested_action (`cancel`, `pause` or None)."""
    return _fenced_update(session, job_id, attempt)


def mark_running(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    training: dict[str, Any],
    memory_estimate_bytes: int | None,
    memory_budget_bytes: int | None,
    memory_device: str,
    total_steps: int | None = None,
) -> str | None:
    """validating_files → running with the resolved options and memory plan; return requested_action."""
    return _fenced_update(
        session,
        job_id,
        attempt,
        status=JobStatus.RUNNING,
        training=training,
        memory_estimate_bytes=memory_estimate_bytes,
        memory_budget_bytes=memory_budget_bytes,
        memory_device=memory_device,
        progress_total_steps=total_steps,
    )


def append_event(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    event_id: str | None = None,
) -> str | None:
    """Add one job event; return the job's requested_action.

    A caller that retries after a lost acknowledgement passes the same `event_id` each time: an event already
    stored under it (the earlier try did commit) is not added again.
    """
    action = _fenced_update(session, job_id, attempt)
    if event_id is not None and _stored(session, JobEvent.id, event_id):
        return action
    ids = {"id": event_id} if event_id is not None else {}
    session.add(JobEvent(job_id=job_id, attempt=attempt, level=level, type=type, message=message, data=data, **ids))
    session.flush()
    return action


def _stored(session: Session, column: Any, value: str) -> bool:
    return session.scalar(select(column).where(column == value)) is not None


def record_checkpoint(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    step_number: int,
    path: str,
    metrics: dict[str, Any] | None,
    checkpoint_id: str | None = None,
) -> str:
    """Add a checkpoints row for a complete checkpoint folder (once per `checkpoint_id`); return its id."""
    _fenced_update(session, job_id, attempt)
    if checkpoint_id is not None and _stored(session, Checkpoint.id, checkpoint_id):
        return checkpoint_id
    ids = {"id": checkpoint_id} if checkpoint_id is not None else {}
    checkpoint = Checkpoint(job_id=job_id, attempt=attempt, step_number=step_number, path=path, metrics=metrics,
                            **ids)
    session.add(checkpoint)
    session.flush()
    return checkpoint.id


def record_telemetry(
    *, session: Session, job_id: str, attempt: int, step: int | None, sample: dict[str, Any], peak_bytes: int | None
) -> None:
    """Add one memory sample and raise the job's recorded peak when this sample is higher."""
    values: dict[str, Any] = {}
    if peak_bytes is not None:
        values["memory_peak_bytes"] = _greatest(Job.memory_peak_bytes, peak_bytes)
    _fenced_update(session, job_id, attempt, **values)
    session.add(TelemetrySample(job_id=job_id, attempt=attempt, step=step, sample=sample))
    session.flush()


def record_progress(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    step: int,
    total_steps: int | None,
    epoch: float | None,
    peak_bytes: int | None = None,
    estimated_finish: int | None = None,
) -> str | None:
    """Store the step, total steps, epoch, peak memory and estimated finish; return requested_action."""
    values: dict[str, Any] = {"progress_step": step, "progress_epoch": epoch, "estimated_finish": estimated_finish}
    if total_steps is not None:
        values["progress_total_steps"] = total_steps
    if peak_bytes is not None:
        values["memory_peak_bytes"] = _greatest(Job.memory_peak_bytes, peak_bytes)
    return _fenced_update(session, job_id, attempt, **values)


def _greatest(column: Any, value: int) -> ColumnElement[Any]:
    """max(column, value) in SQL on both SQLite and PostgreSQL, treating NULL as 0."""
    return case((func.coalesce(column, 0) >= value, func.coalesce(column, 0)), else_=value)


def recorded_checkpoint_steps(*, session: Session, job_id: str) -> set[int]:
    """The steps of the job's checkpoints already in SQL."""
    return set(session.scalars(select(Checkpoint.step_number).where(Checkpoint.job_id == job_id)))


def store_result_file(
    *, session: Session, job_id: str, attempt: int, path: str, sha256: str, size: int, filename: str
) -> str:
    """Record the adapter archive (already on disk at `path`, relative to data_dir) as a result file."""
    _fenced_update(session, job_id, attempt)
    project_id = session.scalar(select(Job.project_id).where(Job.id == job_id))
    result = File(
        project_id=project_id,
        filename=filename,
        purpose=RESULT_FILE_PURPOSE,
        bytes=size,
        sha256=sha256,
        path=path,
        status="processed",  # a file's status, not a job's
    )
    session.add(result)
    session.flush()
    session.add(Artifact(job_id=job_id, file_id=result.id, kind="adapter", path=path, sha256=sha256, bytes=size))
    session.flush()
    return result.id


def finish(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    status: JobStatus,
    error: dict[str, Any] | None = None,
    fine_tuned_model: str | None = None,
    result_files: list[str] | None = None,
    trained_tokens: int | None = None,
) -> None:
    """Record the attempt's outcome: succeeded, failed, cancelled or paused (paused keeps the job resumable)."""
    values: dict[str, Any] = {"error": error, "requested_action": None, "worker": None}
    if status != JobStatus.PAUSED:
        values["finished_at"] = now()
        values["estimated_finish"] = None
    if fine_tuned_model is not None:
        values["fine_tuned_model"] = fine_tuned_model
    if result_files is not None:
        values["result_files"] = result_files
    if trained_tokens is not None:
        values["trained_tokens"] = trained_tokens
    lease.finish(session, JOBS, job_id, attempt, status=status, **values)


def lost_attempts(*, session: Session, job_id: str) -> int:
    """How many of the job's attempts were lost to a crashed trainer or a dead worker."""
    query = select(func.count()).select_from(JobEvent).where(
        JobEvent.job_id == job_id, JobEvent.message.startswith(LOST_ATTEMPT_PREFIX)
    )
    return int(session.scalar(query) or 0)


def record_lost_attempt(*, session: Session, job_id: str, attempt: int, reason: str) -> None:
    """Note that `attempt` was lost (a warn event); the reconciler's write, or the fenced crash path's."""
    session.add(JobEvent(job_id=job_id, attempt=attempt, level="warn", type="message",
                         message=LOST_ATTEMPT_PREFIX + reason))
    session.flush()


def requeue(*, session: Session, job_id: str, attempt: int) -> None:
    """Give the job back to the queue as its next attempt (after a trainer crash below the retry cap)."""
    lease.finish(session, JOBS, job_id, attempt, status=JobStatus.QUEUED, worker=None)


def job_context(*, session: Session, job_id: str) -> tuple[Job, Project] | None:
    """The job and its project, or None when the job is gone."""
    query = select(Job, Project).join(Project, Project.id == Job.project_id).where(Job.id == job_id)
    row = session.execute(query).first()
    return None if row is None else (row[0], row[1])


# The reconciler's writes: each conditional, so any number of reconcilers may run at once.


@dataclass(frozen=True)
class SilentAttempt:
    """A claimed job with no heartbeat for the expiry."""

    id: str
    attempt: int
    requested_action: str | None


def expired_attempts(*, session: Session, expiry_seconds: int) -> list[tuple[str, int, str | None]]:
    """(job_id, attempt, requested_action) of claimed jobs with no heartbeat for `expiry_seconds`."""
    rows = session.execute(
        select(Job.id, Job.attempt, Job.requested_action).where(lease.silent(JOBS, expiry_seconds))
    ).all()
    return [(row[0], int(row[1]), row[2]) for row in rows]


def silent_attempts(*, session: Session, expiry_seconds: int) -> list[SilentAttempt]:
    """The claimed jobs with no heartbeat for `expiry_seconds`."""
    return [SilentAttempt(*row) for row in expired_attempts(session=session, expiry_seconds=expiry_seconds)]


def expire_attempt(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    expiry_seconds: int,
    status: JobStatus,
    error: dict[str, Any] | None = None,
) -> bool:
    """Move an attempt silent for `expiry_seconds` to `status` (queued, failed, cancelled, paused); False if alive."""
    values: dict[str, Any] = {"error": error}
    if status in (JobStatus.FAILED, JobStatus.CANCELLED):
        values.update(finished_at=now(), requested_action=None, estimated_finish=None)
    elif status == JobStatus.PAUSED:
        values["requested_action"] = None
    return lease.expire(session, JOBS, job_id, attempt, expiry_seconds=expiry_seconds, status=status, **values)


def _expired_outcome(lost: int, action: str | None, max_attempts: int) -> tuple[JobStatus, dict[str, Any] | None]:
    """The status (and error) a job whose worker vanished moves to; `lost` counts this loss too."""
    if action == "cancel":
        return JobStatus.CANCELLED, None
    if action == "pause":
        return JobStatus.PAUSED, None
    if lost >= max_attempts:
        message = (
            f"Gave up after {lost} lost attempts (max_attempts {max_attempts}); last: the worker stopped "
            "answering (no heartbeat)."
        )
        return JobStatus.FAILED, {"code": "worker_lost", "message": message, "param": None}
    return JobStatus.QUEUED, None


def expire_silent(*, session: Session, silent: SilentAttempt, expiry_seconds: int, max_attempts: int
                  ) -> JobStatus | None:
    """Honour a pending cancel or pause, else requeue (or fail at `max_attempts` losses) and record the loss;
    the status it moved to, or None when it heartbeat meanwhile or another reconciler got there first."""
    job_id, attempt = silent.id, silent.attempt
    lost = lost_attempts(session=session, job_id=job_id) + 1
    status, error = _expired_outcome(lost, silent.requested_action, max_attempts)
    if not expire_attempt(session=session, job_id=job_id, attempt=attempt, expiry_seconds=expiry_seconds,
                          status=status, error=error):
        return None
    if status in (JobStatus.QUEUED, JobStatus.FAILED):
        reason = f"the worker running attempt {attempt} stopped answering (no heartbeat for {expiry_seconds} s)"
        record_lost_attempt(session=session, job_id=job_id, attempt=attempt, reason=reason)
    return status


def unclaimed_queued_jobs(*, session: Session, older_than_seconds: int, limit: int = 100) -> list[str]:
    """Queued jobs whose message was last sent more than `older_than_seconds` ago, oldest first."""
    return lease.unsent_for(session=session, kind=JOBS, older_than_seconds=older_than_seconds, limit=limit)


def count_queued_jobs(*, session: Session) -> int:
    """How many jobs wait in `queued`."""
    return lease.count_sendable(session=session, kind=JOBS)


def ring_again(*, session: Session, job_id: str, older_than_seconds: int) -> bool:
    """Note that a queued job's message is sent again now; False when another reconciler just did."""
    return lease.ring_again(session=session, kind=JOBS, row_id=job_id, older_than_seconds=older_than_seconds)


JOBS = LeaseKind(name="job", model=Job, active=ACTIVE_RUN_STATUSES, task_name=RUN_JOB, sendable=_queued,
                 sent_before=_sent_before, silent_attempts=silent_attempts, expire_silent=expire_silent)
