"""The worker's SQL writes for one evaluation attempt, fenced by (evaluation_id, attempt) through the lease.

An evaluation is leased work (backend/services/lease.py) like a job: a worker claims the row (a conditional
UPDATE raising `attempt`), and each write it makes afterwards is fenced by `status = running`; a stale
attempt's write raises StaleAttemptError. The reconciler requeues an evaluation whose heartbeat expired (it
starts over: an evaluation keeps no checkpoints), fails it at `max_attempts`, and re-sends a queued one whose
message may be lost. A queued evaluation's `heartbeat_at` is when its message was last sent by the
reconciler; before that, the later of its creation and its job's success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from backend.db.fence import silent_for
from backend.db.models import Artifact, Evaluation, File, Job, JobEvent, now
from backend.db.statuses import EvaluationStatus, JobStatus
from backend.services import lease
from backend.services.lease import LeaseKind

RUN_EVALUATION = "safetrain.run_evaluation"


@dataclass(frozen=True)
class ClaimedEvaluation:
    """What a worker needs to run one claimed evaluation."""

    id: str
    attempt: int
    job_id: str
    job_attempt: int
    model: str
    options: dict[str, Any]
    eval_path: str  # relative to data_dir
    adapter_path: str  # the adapter archive, relative to data_dir
    adapter_file_id: str | None


def _claimable(stale_before: int) -> ColumnElement[bool]:
    """Queued, or running with a heartbeat older than `stale_before` (its worker is gone)."""
    running = Evaluation.status == EvaluationStatus.RUNNING
    return (Evaluation.status == EvaluationStatus.QUEUED) | (running & (Evaluation.heartbeat_at < stale_before))


def claim_evaluation(*, session: Session, evaluation_id: str, worker: str, stale_before: int
                     ) -> ClaimedEvaluation | str:
    """Take a queued evaluation (or a running one whose heartbeat stopped before `stale_before`) as the next
    attempt; a string says why not (gone, finished, taken, or its job has no adapter)."""
    claimed = lease.claim(
        session, EVALUATIONS, evaluation_id, worker=worker, claimable=_claimable(stale_before),
        status=EvaluationStatus.RUNNING, returning=(Evaluation.job_id, Evaluation.file_id, Evaluation.options),
        started_at=now(),
    )
    if claimed is None:
        return "gone, finished or taken by another worker"
    attempt, job_id, file_id, options = claimed
    job = session.scalar(select(Job).where(Job.id == job_id))
    evals_file = session.scalar(select(File).where(File.id == file_id))
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "adapter")
                              .order_by(Artifact.seq.desc()).limit(1))
    succeeded = job is not None and job.status == JobStatus.SUCCEEDED
    if job is None or not succeeded or artifact is None or evals_file is None:
        reason = ("the evaluation file no longer exists" if evals_file is None and succeeded
                  else "the job has no adapter to evaluate: it did not succeed")
        finish(session=session, evaluation_id=evaluation_id, attempt=int(attempt), status=EvaluationStatus.FAILED,
               error=reason)
        return reason
    return ClaimedEvaluation(
        id=evaluation_id, attempt=int(attempt), job_id=job_id, job_attempt=job.attempt, model=job.model,
        options=dict(options), eval_path=evals_file.path, adapter_path=artifact.path,
        adapter_file_id=artifact.file_id,
    )


def heartbeat(*, session: Session, evaluation_id: str, attempt: int) -> None:
    """Mark the attempt alive; StaleAttemptError when another attempt took the evaluation."""
    lease.fenced_update(session, EVALUATIONS, evaluation_id, attempt)


def finish(*, session: Session, evaluation_id: str, attempt: int, status: EvaluationStatus,
           results: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Record the attempt's outcome (succeeded or failed); StaleAttemptError when the attempt was stale."""
    lease.finish(session, EVALUATIONS, evaluation_id, attempt, status=status, results=results, error=error,
                 finished_at=now())


def append_job_event(*, session: Session, job_id: str, attempt: int, message: str, level: str = "info",
                     type: str = "message", data: dict[str, Any] | None = None) -> None:
    """An event on the evaluated job (the job has finished: no attempt fence applies to it any more)."""
    session.add(JobEvent(job_id=job_id, attempt=attempt, level=level, type=type, message=message, data=data))


def update_artifact_digest(*, session: Session, job_id: str, path: str, sha256: str, size: int) -> None:
    """The adapter archive at `path` was rewritten (its safetrain.json gained results): record its new digest."""
    session.execute(update(Artifact).where(Artifact.job_id == job_id, Artifact.path == path)
                    .values(sha256=sha256, bytes=size).execution_options(synchronize_session=False))
    session.execute(update(File).where(File.path == path).values(sha256=sha256, bytes=size)
                    .execution_options(synchronize_session=False))


def queued_for_job(*, session: Session, job_id: str) -> list[str]:
    """The ids of the job's evaluations still waiting (those that follow training)."""
    return list(session.scalars(select(Evaluation.id).where(Evaluation.job_id == job_id,
                                                            Evaluation.status == EvaluationStatus.QUEUED)))


def fail_queued(*, session: Session, job_id: str, reason: str) -> int:
    """Fail the job's waiting evaluations (its training did not succeed); how many."""
    result = session.execute(
        update(Evaluation).where(Evaluation.job_id == job_id, Evaluation.status == EvaluationStatus.QUEUED)
        .values(status=EvaluationStatus.FAILED, error=reason, finished_at=now())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# The reconciler's writes: each conditional, so any number of reconcilers may run at once.


@dataclass(frozen=True)
class SilentEvaluation:
    """A running evaluation with no heartbeat for the expiry, and the job its events belong to."""

    id: str
    attempt: int
    job_id: str
    job_attempt: int


def expired_evaluations(*, session: Session, expiry_seconds: int) -> list[tuple[str, int, str, int]]:
    """(evaluation_id, attempt, job_id, job_attempt) of running evaluations with no heartbeat for `expiry_seconds`."""
    rows = session.execute(
        select(Evaluation.id, Evaluation.attempt, Evaluation.job_id, Job.attempt)
        .join(Job, Job.id == Evaluation.job_id)
        .where(lease.silent(EVALUATIONS, expiry_seconds))
        .order_by(Evaluation.seq)
    ).all()
    return [(row[0], int(row[1]), row[2], int(row[3])) for row in rows]


def silent_attempts(*, session: Session, expiry_seconds: int) -> list[SilentEvaluation]:
    """The running evaluations with no heartbeat for `expiry_seconds`."""
    return [SilentEvaluation(*row) for row in expired_evaluations(session=session, expiry_seconds=expiry_seconds)]


def expire_attempt(*, session: Session, evaluation_id: str, attempt: int, expiry_seconds: int,
                   status: EvaluationStatus, error: str | None = None) -> bool:
    """Move an attempt silent for `expiry_seconds` to `queued` (its message about to be sent again, so
    `heartbeat_at` becomes the send time) or `failed` (with `error`); False when it was alive or taken."""
    values: dict[str, Any] = {"error": error}
    if status == EvaluationStatus.FAILED:
        values["finished_at"] = now()
    return lease.expire(session, EVALUATIONS, evaluation_id, attempt, expiry_seconds=expiry_seconds, status=status,
                        **values)


def expire_silent(*, session: Session, silent: SilentEvaluation, expiry_seconds: int, max_attempts: int
                  ) -> EvaluationStatus | None:
    """Requeue a silent evaluation (or fail it at `max_attempts`) and say so on its job; the status it moved
    to, or None when it was alive or another reconciler got there first."""
    cause = (f"the worker stopped answering (no heartbeat for {expiry_seconds} s) on attempt {silent.attempt} "
             f"of {max_attempts}")
    if silent.attempt >= max_attempts:
        status, error = EvaluationStatus.FAILED, f"Gave up: {cause}."
    else:
        status, error = EvaluationStatus.QUEUED, None
    if not expire_attempt(session=session, evaluation_id=silent.id, attempt=silent.attempt,
                          expiry_seconds=expiry_seconds, status=status, error=error):
        return None
    if status == EvaluationStatus.FAILED:
        message, level = f"Evaluation {silent.id} failed: {cause}", "error"
    else:
        message, level = f"Evaluation {silent.id}: {cause}; queued again", "warn"
    append_job_event(session=session, job_id=silent.job_id, attempt=silent.job_attempt, message=message,
                     level=level, data={"evaluation_id": silent.id, "attempt": silent.attempt})
    return status


def _sendable() -> ColumnElement[bool]:
    """A queued evaluation whose job succeeded: one that ought to have a message waiting."""
    succeeded_jobs = select(Job.id).where(Job.status == JobStatus.SUCCEEDED)
    return (Evaluation.status == EvaluationStatus.QUEUED) & Evaluation.job_id.in_(succeeded_jobs)


def _sent_before(seconds: int) -> ColumnElement[bool]:
    # When the message was last sent: heartbeat_at once the reconciler sent it; before that, the later of the
    # evaluation's creation (asked for on a succeeded job) and its job's success (sent when training ended).
    job_finished_at = select(Job.finished_at).where(Job.id == Evaluation.job_id).scalar_subquery()
    return (silent_for(func.coalesce(Evaluation.heartbeat_at, Evaluation.created_at), seconds)
            & silent_for(func.coalesce(Evaluation.heartbeat_at, job_finished_at), seconds))


def unclaimed_queued_evaluations(*, session: Session, older_than_seconds: int, limit: int = 100) -> list[str]:
    """Queued evaluations of succeeded jobs whose message was last sent over `older_than_seconds` ago, oldest first."""
    return lease.unsent_for(session=session, kind=EVALUATIONS, older_than_seconds=older_than_seconds, limit=limit)


def count_sendable_queued(*, session: Session) -> int:
    """How many queued evaluations of succeeded jobs wait for a worker (each should have a message waiting)."""
    return lease.count_sendable(session=session, kind=EVALUATIONS)


def ring_again(*, session: Session, evaluation_id: str, older_than_seconds: int) -> bool:
    """Note that a queued evaluation's message is sent again now; False when another reconciler just did."""
    return lease.ring_again(session=session, kind=EVALUATIONS, row_id=evaluation_id,
                            older_than_seconds=older_than_seconds)


EVALUATIONS = LeaseKind(name="evaluation", model=Evaluation, active=(EvaluationStatus.RUNNING,),
                        task_name=RUN_EVALUATION, sendable=_sendable, sent_before=_sent_before,
                        silent_attempts=silent_attempts, expire_silent=expire_silent)
