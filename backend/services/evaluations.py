"""Sandboxed code evaluations of a job's adapter: the request, its rows, and the worker's claim and outcome.

An evaluation either follows training (the job's `evaluation` option: its row is written with the job and
sent to the workers once the job succeeds) or is asked for on a succeeded job. Either way a worker claims
the row (a conditional UPDATE raising `attempt`), runs the harness in a child process, and records the
results here; writes from a stale attempt are refused.

Heartbeats are stamped with the database's clock, as jobs' are, so that the reconciler (which requeues an
evaluation whose heartbeat expired, or fails it at `max_attempts`, and re-sends a queued one whose message
may be lost) judges them by the same clock. A queued evaluation's `heartbeat_at` is when its message was
last sent by the reconciler; before that, the later of its creation and its job's success.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from backend.db.models import Artifact, Evaluation, File, Job, JobEvent, Project, now
from backend.services.errors import InvalidRequest, NotFound
from backend.services.ids import looks_like_id
from backend.services.job_runs import database_now
from backend.services.pagination import Page, keyset_page

log = logging.getLogger(__name__)

EVALUATION_FIELDS = ("file", "n_samples", "k", "max_new_tokens", "temperature", "mode", "timeout_s")
MAX_SAMPLES = 20
MAX_NEW_TOKENS = 2048
MAX_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EvaluationOptions:
    """A validated evaluation request (the shape of the `evaluation` object)."""

    file: str
    n_samples: int = 1
    k: tuple[int, ...] = (1,)
    max_new_tokens: int = 256
    temperature: float = 0.2
    mode: str = "sandbox"
    timeout_s: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "n_samples": self.n_samples, "k": list(self.k),
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "mode": self.mode,
                "timeout_s": self.timeout_s}


def _integer(body: dict[str, Any], name: str, default: int, low: int, high: int, prefix: str) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{prefix}{name} must be an integer from {low} to {high}.", param=prefix + name)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, prefix: str) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidRequest(f"{prefix}{name} must be a number from {low} to {high}.", param=prefix + name)
    return float(value)


def parse_options(body: Any, *, prefix: str = "") -> EvaluationOptions:
    """Check an `evaluation` object; InvalidRequest (400) names the field at fault (`prefix` + name)."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"{prefix.rstrip('.') or 'The body'} must be a JSON object.", param=prefix.rstrip(".")
                             or None)
    unknown = sorted(set(body) - set(EVALUATION_FIELDS))
    if unknown:
        raise InvalidRequest(f"Unknown evaluation field {unknown[0][:64]!r}; known: {', '.join(EVALUATION_FIELDS)}.",
                             param=prefix + unknown[0][:64])
    file_id = body.get("file")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest(f"{prefix}file must be the id of a file with purpose evals.", param=prefix + "file")
    n_samples = _integer(body, "n_samples", 1, 1, MAX_SAMPLES, prefix)
    k = body.get("k", [1])
    if not isinstance(k, list) or not k or any(isinstance(v, bool) or not isinstance(v, int) for v in k) \
            or not all(1 <= v <= n_samples for v in k):
        raise InvalidRequest(f"{prefix}k must be a non-empty list of integers from 1 to n_samples ({n_samples}).",
                             param=prefix + "k")
    mode = body.get("mode", "sandbox")
    if mode not in ("sandbox", "lint"):
        raise InvalidRequest(f"{prefix}mode must be 'sandbox' or 'lint'.", param=prefix + "mode")
    return EvaluationOptions(
        file=file_id, n_samples=n_samples, k=tuple(sorted(set(k))),
        max_new_tokens=_integer(body, "max_new_tokens", 256, 1, MAX_NEW_TOKENS, prefix),
        temperature=_number(body, "temperature", 0.2, 0.0, 2.0, prefix), mode=str(mode),
        timeout_s=_number(body, "timeout_s", 10.0, 0.5, MAX_TIMEOUT_S, prefix),
    )


def check_evals_file(*, session: Session, project_id: str, file_id: str, param: str) -> File:
    """The project's processed evals file; 400 naming `param` otherwise (another project's file included)."""
    row = None
    if looks_like_id(file_id):
        row = session.scalar(select(File).where(File.id == file_id, File.project_id == project_id))
    if row is None:
        raise InvalidRequest(f"No such file: {file_id[:100]}", param=param, code="invalid_evaluation_file")
    if row.purpose != "evals" or row.status != "processed":
        raise InvalidRequest(f"File {file_id} is not a processed file with purpose evals.", param=param,
                             code="invalid_evaluation_file")
    return row


def validate_request(*, session: Session, project: Project, body: Any, prefix: str = "") -> EvaluationOptions:
    """Parse an evaluation request and check its file belongs to the project and has purpose evals."""
    options = parse_options(body, prefix=prefix)
    check_evals_file(session=session, project_id=project.id, file_id=options.file, param=prefix + "file")
    return options


def add_evaluation(*, session: Session, job: Job, options: EvaluationOptions) -> Evaluation:
    """Add a queued evaluation of `job` to the session (the caller commits, then enqueues if the job succeeded)."""
    row = Evaluation(job_id=job.id, project_id=job.project_id, file_id=options.file, options=options.to_dict(),
                     status="queued")
    session.add(row)
    session.flush()
    session.add(JobEvent(job_id=job.id, attempt=job.attempt, level="info", type="message",
                         message=f"Evaluation {row.id} queued ({options.mode}, {options.n_samples} samples per task)",
                         data={"evaluation_id": row.id}))
    return row


def enqueue(evaluation_id: str) -> None:
    """Ring the workers' doorbell for a committed evaluation (a failed send is logged, never a 5xx)."""
    from backend.workers.evaluation_dispatch import enqueue_evaluation

    enqueue_evaluation(evaluation_id)


def create_evaluation(*, session: Session, project: Project, job: Job, body: Any) -> Evaluation:
    """Evaluate a succeeded job's adapter: validate, store queued, commit, then enqueue the id."""
    if job.status != "succeeded":
        raise InvalidRequest(f"Job {job.id} is {job.status}: only a succeeded job's adapter can be evaluated.",
                             param="fine_tuning_job_id")
    options = validate_request(session=session, project=project, body=body)
    row = add_evaluation(session=session, job=job, options=options)
    session.commit()
    enqueue(row.id)
    return row


def list_evaluations(*, session: Session, job: Job, after: str | None, limit: int) -> Page[Evaluation]:
    """The job's evaluations, newest first."""
    query = select(Evaluation).where(Evaluation.project_id == job.project_id)
    return keyset_page(
        session=session, query=query, model=Evaluation, after=after, limit=limit,
        partition=(Evaluation.job_id, job.id),
    )


def get_evaluation(*, session: Session, job: Job, evaluation_id: str) -> Evaluation:
    """One evaluation of the job, or NotFound."""
    row = None
    if looks_like_id(evaluation_id):
        row = session.scalar(select(Evaluation).where(
            Evaluation.id == evaluation_id, Evaluation.job_id == job.id, Evaluation.project_id == job.project_id))
    if row is None:
        raise NotFound(f"No such evaluation: {evaluation_id[:100]}", param="evaluation_id")
    return row


# The worker's side.


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


def claim_evaluation(*, session: Session, evaluation_id: str, worker: str, stale_before: int
                     ) -> ClaimedEvaluation | str:
    """Take a queued evaluation (or a running one whose heartbeat stopped before `stale_before`) as the next
    attempt; a string says why not (gone, finished, taken, or its job has no adapter)."""
    claimed = session.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation_id,
               or_(Evaluation.status == "queued",
                   (Evaluation.status == "running") & (Evaluation.heartbeat_at < stale_before)))
        .values(status="running", attempt=Evaluation.attempt + 1, worker=worker, heartbeat_at=database_now(),
                started_at=now(), error=None)
        .returning(Evaluation.attempt, Evaluation.job_id, Evaluation.file_id, Evaluation.options)
        .execution_options(synchronize_session=False)
    ).first()
    if claimed is None:
        return "gone, finished or taken by another worker"
    attempt, job_id, file_id, options = claimed
    job = session.scalar(select(Job).where(Job.id == job_id))
    evals_file = session.scalar(select(File).where(File.id == file_id))
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "adapter")
                              .order_by(Artifact.seq.desc()).limit(1))
    if job is None or job.status != "succeeded" or artifact is None or evals_file is None:
        reason = ("the evaluation file no longer exists" if evals_file is None and job is not None
                  and job.status == "succeeded" else "the job has no adapter to evaluate: it did not succeed")
        finish(session=session, evaluation_id=evaluation_id, attempt=int(attempt), status="failed", error=reason)
        return reason
    return ClaimedEvaluation(
        id=evaluation_id, attempt=int(attempt), job_id=job_id, job_attempt=job.attempt, model=job.model,
        options=dict(options), eval_path=evals_file.path, adapter_path=artifact.path,
        adapter_file_id=artifact.file_id,
    )


def _fence(evaluation_id: str, attempt: int) -> Any:
    return (Evaluation.id == evaluation_id) & (Evaluation.attempt == attempt) & (Evaluation.status == "running")


def heartbeat(*, session: Session, evaluation_id: str, attempt: int) -> bool:
    """Mark the attempt alive; False when it went stale (another attempt took the evaluation)."""
    result = session.execute(update(Evaluation).where(_fence(evaluation_id, attempt))
                             .values(heartbeat_at=database_now()).execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish(*, session: Session, evaluation_id: str, attempt: int, status: str,
           results: dict[str, Any] | None = None, error: str | None = None) -> bool:
    """Record the attempt's outcome (succeeded or failed); False when the attempt was stale."""
    result = session.execute(
        update(Evaluation).where(_fence(evaluation_id, attempt))
        .values(status=status, results=results, error=error, finished_at=now(), heartbeat_at=database_now())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


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
                                                            Evaluation.status == "queued")))


def fail_queued(*, session: Session, job_id: str, reason: str) -> int:
    """Fail the job's waiting evaluations (its training did not succeed); how many."""
    result = session.execute(
        update(Evaluation).where(Evaluation.job_id == job_id, Evaluation.status == "queued")
        .values(status="failed", error=reason, finished_at=now()).execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# The reconciler's writes: each conditional, so any number of reconcilers may run at once.


def _silent_for(column: Any, seconds: int) -> ColumnElement[bool]:
    """`column` (a database-clock timestamp, NULL as 0) is more than `seconds` old."""
    return func.coalesce(column, 0) < database_now() - seconds


def expired_evaluations(*, session: Session, expiry_seconds: int) -> list[tuple[str, int, str, int]]:
    """(evaluation_id, attempt, job_id, job_attempt) of running evaluations with no heartbeat for `expiry_seconds`."""
    rows = session.execute(
        select(Evaluation.id, Evaluation.attempt, Evaluation.job_id, Job.attempt)
        .join(Job, Job.id == Evaluation.job_id)
        .where(Evaluation.status == "running", _silent_for(Evaluation.heartbeat_at, expiry_seconds))
        .order_by(Evaluation.seq)
    ).all()
    return [(row[0], int(row[1]), row[2], int(row[3])) for row in rows]


def expire_attempt(*, session: Session, evaluation_id: str, attempt: int, expiry_seconds: int, status: str,
                   error: str | None = None) -> bool:
    """Move an attempt silent for `expiry_seconds` to `queued` (its message about to be sent again, so
    `heartbeat_at` becomes the send time) or `failed` (with `error`); False when it was alive or taken."""
    values: dict[str, Any] = {"status": status, "worker": None, "heartbeat_at": database_now(), "error": error}
    if status == "failed":
        values["finished_at"] = now()
    result = session.execute(
        update(Evaluation)
        .where(_fence(evaluation_id, attempt), _silent_for(Evaluation.heartbeat_at, expiry_seconds))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _sendable() -> ColumnElement[bool]:
    """A queued evaluation whose job succeeded: one that ought to have a message waiting."""
    return (Evaluation.status == "queued") & Evaluation.job_id.in_(select(Job.id).where(Job.status == "succeeded"))


def _doorbell_silent_for(seconds: int) -> ColumnElement[bool]:
    # When the message was last sent: heartbeat_at once the reconciler sent it; before that, the later of the
    # evaluation's creation (asked for on a succeeded job) and its job's success (sent when training ended).
    job_finished_at = select(Job.finished_at).where(Job.id == Evaluation.job_id).scalar_subquery()
    return (_silent_for(func.coalesce(Evaluation.heartbeat_at, Evaluation.created_at), seconds)
            & _silent_for(func.coalesce(Evaluation.heartbeat_at, job_finished_at), seconds))


def unclaimed_queued_evaluations(*, session: Session, older_than_seconds: int, limit: int = 100) -> list[str]:
    """Queued evaluations of succeeded jobs whose message was last sent over `older_than_seconds` ago, oldest first."""
    query = select(Evaluation.id).where(_sendable(), _doorbell_silent_for(older_than_seconds))
    return list(session.scalars(query.order_by(Evaluation.seq).limit(limit)))


def count_sendable_queued(*, session: Session) -> int:
    """How many queued evaluations of succeeded jobs wait for a worker (each should have a message waiting)."""
    return int(session.scalar(select(func.count()).select_from(Evaluation).where(_sendable())) or 0)


def ring_again(*, session: Session, evaluation_id: str, older_than_seconds: int) -> bool:
    """Note that a queued evaluation's message is sent again now; False when another reconciler just did."""
    result = session.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation_id, _sendable(), _doorbell_silent_for(older_than_seconds))
        .values(heartbeat_at=database_now())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]
