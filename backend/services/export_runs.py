"""The worker's SQL writes for one export attempt, fenced by (export_id, attempt) through the lease.

An export is leased work (backend/services/lease.py) like a job or an evaluation: a worker claims the row (a
conditional UPDATE raising `attempt`), and each write it makes afterwards is fenced by `status = running`; a
stale attempt's write raises StaleAttemptError. A heartbeat answers the row's `requested_action`, so a cancel
reaches the supervisor, which stops the merge's child. The reconciler requeues an export whose heartbeat
expired (it starts over: a merge keeps nothing between attempts), cancels it when a cancel was pending, fails
it at `max_attempts`, and re-sends a queued one whose message may be lost. A queued export's `heartbeat_at` is
when its message was last sent by the reconciler; before that, its creation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from backend.db.fence import silent_for
from backend.db.models import Artifact, Export, File, Job, JobEvent, now
from backend.db.statuses import ExportStatus, JobStatus
from backend.services import lease
from backend.services.lease import LeaseKind

RUN_EXPORT = "safetrain.run_export"
EXPORT_FILE_PURPOSE = "fine-tune-results"


@dataclass(frozen=True)
class ClaimedExport:
    """What a worker needs to run one claimed export."""

    id: str
    attempt: int
    job_id: str
    job_attempt: int
    project_id: str
    model: str
    format: str
    adapter_path: str  # the adapter archive, relative to data_dir


def _claimable(stale_before: int) -> ColumnElement[bool]:
    """Queued, or running with a heartbeat older than `stale_before` (its worker is gone)."""
    running = Export.status == ExportStatus.RUNNING
    return (Export.status == ExportStatus.QUEUED) | (running & (Export.heartbeat_at < stale_before))


def claim_export(*, session: Session, export_id: str, worker: str, stale_before: int) -> ClaimedExport | str:
    """Take a queued export (or a running one whose heartbeat stopped before `stale_before`) as the next attempt;
    a string says why not (gone, finished, taken, or its job has no adapter any more)."""
    claimed = lease.claim(
        session, EXPORTS, export_id, worker=worker, claimable=_claimable(stale_before), status=ExportStatus.RUNNING,
        returning=(Export.job_id, Export.format), started_at=now(),
    )
    if claimed is None:
        return "gone, finished or taken by another worker"
    attempt, job_id, export_format = claimed
    job = session.scalar(select(Job).where(Job.id == job_id))
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "adapter")
                              .order_by(Artifact.seq.desc()).limit(1))
    if job is None or job.status != JobStatus.SUCCEEDED or artifact is None:
        reason = "the job has no adapter to export: it did not succeed"
        finish(session=session, export_id=export_id, attempt=int(attempt), status=ExportStatus.FAILED, error=reason)
        return reason
    return ClaimedExport(id=export_id, attempt=int(attempt), job_id=job_id, job_attempt=job.attempt,
                         project_id=job.project_id, model=job.model, format=export_format,
                         adapter_path=artifact.path)


def heartbeat(*, session: Session, export_id: str, attempt: int) -> str | None:
    """Mark the attempt alive; return the export's requested_action (`cancel` or None)."""
    action: str | None = lease.fenced_update(session, EXPORTS, export_id, attempt,
                                             returning=Export.requested_action)
    return action


def store_export_file(*, session: Session, export_id: str, attempt: int, path: str, sha256: str, size: int,
                      filename: str) -> str:
    """Record the merged model's archive (already on disk at `path`, relative to data_dir) as a file; its id."""
    project_id = lease.fenced_update(session, EXPORTS, export_id, attempt, returning=Export.project_id)
    row = File(project_id=project_id, filename=filename, purpose=EXPORT_FILE_PURPOSE, bytes=size, sha256=sha256,
               path=path, status="processed")
    session.add(row)
    session.flush()
    return row.id


def finish(*, session: Session, export_id: str, attempt: int, status: ExportStatus, file_id: str | None = None,
           error: str | None = None) -> None:
    """Record the attempt's outcome (succeeded, failed or cancelled); StaleAttemptError when it was stale."""
    lease.finish(session, EXPORTS, export_id, attempt, status=status, file_id=file_id, error=error,
                 requested_action=None, worker=None, finished_at=now())


def append_job_event(*, session: Session, job_id: str, attempt: int, message: str, level: str = "info",
                     data: dict[str, Any] | None = None) -> None:
    """An event on the exported job (the job has finished: no attempt fence applies to it any more)."""
    session.add(JobEvent(job_id=job_id, attempt=attempt, level=level, type="message", message=message, data=data))


# The reconciler's writes: each conditional, so any number of reconcilers may run at once.


@dataclass(frozen=True)
class SilentExport:
    """A running export with no heartbeat for the expiry, and the job its events belong to."""

    id: str
    attempt: int
    requested_action: str | None
    job_id: str
    job_attempt: int


def silent_attempts(*, session: Session, expiry_seconds: int) -> list[SilentExport]:
    """The running exports with no heartbeat for `expiry_seconds`."""
    rows = session.execute(
        select(Export.id, Export.attempt, Export.requested_action, Export.job_id, Job.attempt)
        .join(Job, Job.id == Export.job_id)
        .where(lease.silent(EXPORTS, expiry_seconds))
        .order_by(Export.seq)
    ).all()
    return [SilentExport(row[0], int(row[1]), row[2], row[3], int(row[4])) for row in rows]


def _expired_outcome(silent: SilentExport, cause: str, max_attempts: int) -> tuple[ExportStatus, str | None]:
    if silent.requested_action == "cancel":
        return ExportStatus.CANCELLED, None
    if silent.attempt >= max_attempts:
        return ExportStatus.FAILED, f"Gave up: {cause}."
    return ExportStatus.QUEUED, None


def expire_silent(*, session: Session, silent: SilentExport, expiry_seconds: int, max_attempts: int
                  ) -> ExportStatus | None:
    """Cancel a silent export with a pending cancel, else requeue it (or fail it at `max_attempts`) and say so on
    its job; the status it moved to, or None when it was alive or another reconciler got there first."""
    cause = (f"the worker stopped answering (no heartbeat for {expiry_seconds} s) on attempt {silent.attempt} "
             f"of {max_attempts}")
    status, error = _expired_outcome(silent, cause, max_attempts)
    values: dict[str, Any] = {"error": error}
    if status != ExportStatus.QUEUED:
        values.update(finished_at=now(), requested_action=None)
    if not lease.expire(session, EXPORTS, silent.id, silent.attempt, expiry_seconds=expiry_seconds, status=status,
                        **values):
        return None
    messages = {ExportStatus.CANCELLED: (f"Export {silent.id} cancelled: {cause}", "warn"),
                ExportStatus.FAILED: (f"Export {silent.id} failed: {cause}", "error"),
                ExportStatus.QUEUED: (f"Export {silent.id}: {cause}; queued again", "warn")}
    message, level = messages[status]
    append_job_event(session=session, job_id=silent.job_id, attempt=silent.job_attempt, message=message,
                     level=level, data={"export_id": silent.id, "attempt": silent.attempt})
    return status


def _sendable() -> ColumnElement[bool]:
    """A queued export: one that ought to have a message waiting (it is only written for a succeeded job)."""
    return Export.status == ExportStatus.QUEUED


def _sent_before(seconds: int) -> ColumnElement[bool]:
    # A queued export's heartbeat_at is when its message was last sent (by a requeue or a re-send); before that,
    # its creation, when the API sent it.
    return silent_for(func.coalesce(Export.heartbeat_at, Export.created_at), seconds)


EXPORTS = LeaseKind(name="export", model=Export, active=(ExportStatus.RUNNING,), task_name=RUN_EXPORT,
                    sendable=_sendable, sent_before=_sent_before, silent_attempts=silent_attempts,
                    expire_silent=expire_silent)
