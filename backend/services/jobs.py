"""Fine-tuning jobs: creation (validated, quota-checked, committed, then enqueued) and the state machine."""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    Checkpoint,
    File,
    Job,
    JobEvent,
    JobStatus,
    Project,
    TelemetrySample,
    now,
)
from backend.db.statuses import can_move
from backend.services import evaluation_options, evaluations
from backend.services.base_models import resolve_base_model
from backend.services.errors import InvalidRequest, NotFound, QuotaExceeded
from backend.services.job_request import JobCreateRequest
from backend.services.lookup import project_row
from backend.services.pagination import Page, keyset_page
from backend.services.quotas import lock_project
from backend.services.training_request import resolve_training

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_METADATA_KEYS = 16


def _dataset_file(*, session: Session, project: Project, file_id: str, param: str) -> File:
    missing = InvalidRequest(f"No such file: {file_id[:100]}", param=param, code="invalid_" + param)
    row = project_row(session=session, model=File, row_id=file_id, project_id=project.id, missing=missing)
    if row.purpose != "fine-tune" or row.status != "processed":
        raise InvalidRequest(f"File {file_id} is not a processed fine-tune dataset.", param=param)
    return row


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"metadata holds at most {MAX_METADATA_KEYS} keys.", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise InvalidRequest("metadata keys are strings up to 64 characters, values up to 512.", param="metadata")
        if "\x00" in key or "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise InvalidRequest("metadata keys and values must not contain NUL characters.", param="metadata")


def active_job_count(*, session: Session, project: Project) -> int:
    """Jobs of the project that hold or wait for a worker."""
    query = select(func.count()).where(Job.project_id == project.id, Job.status.in_(ACTIVE_JOB_STATUSES))
    return int(session.scalar(query) or 0)


def _check_job_quota(*, session: Session, settings: Settings, project: Project) -> None:
    """Refuse (429) when the project is at its cap; holds the project's lock until the caller commits."""
    lock_project(session=session, project_id=project.id)
    limit = project.max_concurrent_jobs or settings.max_concurrent_jobs
    if active_job_count(session=session, project=project) >= limit:
        raise QuotaExceeded(f"The project already has {limit} unfinished jobs, its quota.")


def add_event(*, session: Session, job: Job, message: str, level: str = "info") -> None:
    """Record a message event of the job (the API's own: created, cancel asked, …)."""
    session.add(JobEvent(job_id=job.id, attempt=job.attempt, level=level, type="message", message=message))


def check_method_fits_file(*, method_type: str, row: File, param: str) -> None:
    """Refuse a dataset whose format the method does not train on: DPO takes preference lines, supervised the rest."""
    if row.format is None or (row.format == "preference") == (method_type == "dpo"):
        return
    if method_type == "dpo":
        message = (f'File {row.id} is a "{row.format}" file; method "dpo" trains on preference lines '
                   '({"input", "preferred_output", "non_preferred_output"}).')
    else:
        message = (f'File {row.id} holds preference lines, which train with method "dpo", not '
                   f'"{method_type}" (its lines are chat, prompt/completion, text or instruction).')
    raise InvalidRequest(message, param=param, code="invalid_" + param)


def _check_integrations(spec: JobCreateRequest) -> None:
    """The shapes are the request model's; here, that this server can log to W&B at all."""
    if spec.integrations and importlib.util.find_spec("wandb") is None:
        raise InvalidRequest("The wandb integration needs the wandb package, which this server does not have.",
                             param="integrations")


def _check_datasets(*, session: Session, project: Project, spec: JobCreateRequest, method_type: str) -> None:
    row = _dataset_file(session=session, project=project, file_id=spec.training_file, param="training_file")
    check_method_fits_file(method_type=method_type, row=row, param="training_file")
    if spec.validation_file is not None:
        row = _dataset_file(session=session, project=project, file_id=spec.validation_file, param="validation_file")
        check_method_fits_file(method_type=method_type, row=row, param="validation_file")


def create_job(
    *, session: Session, settings: Settings, project: Project, spec: JobCreateRequest, enqueue: Callable[[str], None]
) -> Job:
    """Validate the request, store the job as queued, commit, then `enqueue` its id (a send that fails is logged
    there, never raised: the row is committed and queued, so the reconciler sends it again)."""
    _check_integrations(spec)
    model = resolve_base_model(spec.model, settings=settings)
    resolved = resolve_training(
        hyperparameters=spec.hyperparameters, method=spec.method, training=spec.training, seed=spec.seed
    )
    _check_datasets(session=session, project=project, spec=spec, method_type=resolved.method["type"])
    if spec.suffix is not None and not _SUFFIX.fullmatch(spec.suffix):
        raise InvalidRequest("suffix must be 1 to 64 letters, digits, '-' or '_'.", param="suffix")
    _check_metadata(spec.metadata)
    evaluation = None
    if spec.evaluation is not None:
        evaluation = evaluation_options.validate_request(session=session, project=project, body=spec.evaluation,
                                                         prefix="evaluation.")
    _check_job_quota(session=session, settings=settings, project=project)  # locks the project until the commit
    # Under the lock, the datasets are still there: a delete that raced the checks above has either won or waits.
    _check_datasets(session=session, project=project, spec=spec, method_type=resolved.method["type"])
    job = Job(
        project_id=project.id,
        model=model.name,
        training_file_id=spec.training_file,
        validation_file_id=spec.validation_file,
        status=JobStatus.QUEUED,
        hyperparameters=resolved.hyperparameters,
        method=resolved.method,
        training=resolved.training,
        integrations=[entry.model_dump() for entry in spec.integrations] if spec.integrations else None,
        metadata_=spec.metadata,
        suffix=spec.suffix,
        seed=resolved.options.seed,
        result_files=[],
    )
    session.add(job)
    session.flush()
    add_event(session=session, job=job, message=f"Created fine-tuning job: {job.id}")
    if evaluation is not None:
        evaluations.add_evaluation(session=session, job=job, options=evaluation)  # sent once training succeeds
    session.commit()
    enqueue(job.id)
    return job


def get_job(*, session: Session, project: Project, job_id: str) -> Job:
    """The project's job, or NotFound (other projects' jobs included)."""
    missing = NotFound(f"No such fine-tuning job: {job_id[:100]}", param="fine_tuning_job_id")
    return project_row(session=session, model=Job, row_id=job_id, project_id=project.id, missing=missing)


def list_jobs(
    *, session: Session, project: Project, after: str | None, limit: int, metadata: dict[str, str] | None = None
) -> Page[Job]:
    """The project's jobs, newest first, optionally those whose metadata holds every given pair."""
    query = select(Job)
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].as_string() == value)
    return keyset_page(
        session=session, query=query, model=Job, after=after, limit=limit, partition=(Job.project_id, project.id)
    )


def _transition(*, session: Session, job: Job, from_status: str, **values: Any) -> bool:
    """Apply `values` only if the job still has `from_status` (a worker may have moved it meanwhile)."""
    if "status" in values and not can_move((from_status,), values["status"]):
        raise ValueError(f"job {job.id}: no move from {from_status} to {values['status']}")
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == from_status)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _refuse_finished(job: Job, action: str) -> None:
    if job.status in TERMINAL_JOB_STATUSES:
        raise InvalidRequest(f"Cannot {action} job {job.id}: it has already {job.status}.", param="fine_tuning_job_id")


def cancel_job(*, session: Session, job: Job) -> Job:
    """Cancel: a queued or paused job at once; a running one cooperatively (the worker stops it)."""
    for _ in range(3):
        _refuse_finished(job, "cancel")
        if job.status in (JobStatus.QUEUED, JobStatus.PAUSED):
            done = _transition(
                session=session,
                job=job,
                from_status=job.status,
                status=JobStatus.CANCELLED,
                finished_at=now(),
                requested_action=None,
            )
        else:
            done = _transition(session=session, job=job, from_status=job.status, requested_action="cancel")
        if done:
            add_event(
                session=session, job=job, message="Cancellation requested" if job.requested_action else "Job cancelled"
            )
            session.commit()
            return job
    raise InvalidRequest(f"Job {job.id} changed state while cancelling; try again.", param="fine_tuning_job_id")


def pause_job(*, session: Session, job: Job) -> Job:
    """Pause: a running job checkpoints and stops (the worker does it); a queued one waits as paused."""
    for _ in range(3):
        _refuse_finished(job, "pause")
        if job.status == JobStatus.PAUSED or job.requested_action == "pause":
            return job
        if job.status == JobStatus.QUEUED:
            done = _transition(session=session, job=job, from_status=JobStatus.QUEUED, status=JobStatus.PAUSED)
        elif job.requested_action == "cancel":
            raise InvalidRequest(f"Job {job.id} is being cancelled.", param="fine_tuning_job_id")
        else:
            done = _transition(session=session, job=job, from_status=job.status, requested_action="pause")
        if done:
            add_event(session=session, job=job, message="Pause requested" if job.requested_action else "Job paused")
            session.commit()
            return job
    raise InvalidRequest(f"Job {job.id} changed state while pausing; try again.", param="fine_tuning_job_id")


def resume_job(
    *, session: Session, settings: Settings, project: Project, job: Job, enqueue: Callable[[str], None]
) -> Job:
    """Resume a paused job: back to queued (the worker continues from the last checkpoint), then `enqueue` it."""
    if job.status != JobStatus.PAUSED:
        if job.requested_action == "pause" and job.status not in TERMINAL_JOB_STATUSES:
            _transition(session=session, job=job, from_status=job.status, requested_action=None)
            session.commit()
            return job
        raise InvalidRequest(
            f"Only paused jobs can be resumed; job {job.id} is {job.status}.", param="fine_tuning_job_id"
        )
    _check_job_quota(session=session, settings=settings, project=project)
    if not _transition(session=session, job=job, from_status=JobStatus.PAUSED, status=JobStatus.QUEUED,
                       requested_action=None):
        raise InvalidRequest(f"Job {job.id} changed state while resuming; try again.", param="fine_tuning_job_id")
    add_event(session=session, job=job, message="Job resumed")
    session.commit()
    enqueue(job.id)
    return job


def list_events(*, session: Session, job: Job, after: str | None, limit: int) -> Page[JobEvent]:
    """The job's events, newest first."""
    return keyset_page(
        session=session, query=select(JobEvent), model=JobEvent, after=after, limit=limit,
        partition=(JobEvent.job_id, job.id),
    )


def events_since(*, session: Session, job_id: str, seq: int, limit: int = 500) -> list[JobEvent]:
    """The job's events after event number `seq`, oldest first (the SSE stream)."""
    query = (
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > seq).order_by(JobEvent.seq.asc()).limit(limit)
    )
    return list(session.scalars(query))


def list_checkpoints(*, session: Session, job: Job, after: str | None, limit: int) -> Page[Checkpoint]:
    """The job's complete checkpoints, newest first."""
    return keyset_page(
        session=session, query=select(Checkpoint), model=Checkpoint, after=after, limit=limit,
        partition=(Checkpoint.job_id, job.id),
    )


def list_telemetry(*, session: Session, job: Job, after_seq: int, limit: int) -> Page[TelemetrySample]:
    """The job's memory samples in time order, after sample number `after_seq`."""
    if not 1 <= limit <= 10_000:
        raise InvalidRequest(f"limit must be between 1 and 10000 (got {limit}).", param="limit")
    query = (
        select(TelemetrySample)
        .where(TelemetrySample.job_id == job.id, TelemetrySample.seq > after_seq)
        .order_by(TelemetrySample.seq.asc())
        .limit(limit + 1)
    )
    rows = list(session.scalars(query))
    return Page(rows=rows[:limit], has_more=len(rows) > limit)


def fine_tuned_models(*, session: Session, project: Project) -> list[Job]:
    """The project's succeeded jobs that produced a fine-tuned model, newest first."""
    query = select(Job).where(Job.project_id == project.id, Job.fine_tuned_model.is_not(None)).order_by(Job.seq.desc())
    return list(session.scalars(query))
