"""Sandboxed code evaluations of a job's adapter: the request and its rows.

An evaluation either follows training (the job's `evaluation` option: its row is written with the job and
sent to the workers once the job succeeds) or is asked for on a succeeded job. Either way a worker claims
the row and records its results through backend/services/evaluation_runs.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Evaluation, Job, JobEvent, Project
from backend.db.statuses import EvaluationStatus, JobStatus
from backend.services.errors import InvalidRequest
from backend.services.evaluation_options import EvaluationOptions, validate_request
from backend.services.pagination import Page, keyset_page, row_of_job

log = logging.getLogger(__name__)


def add_evaluation(*, session: Session, job: Job, options: EvaluationOptions) -> Evaluation:
    """Add a queued evaluation of `job` to the session (the caller commits, then enqueues if the job succeeded)."""
    row = Evaluation(job_id=job.id, project_id=job.project_id, file_id=options.file, options=options.to_dict(),
                     status=EvaluationStatus.QUEUED)
    session.add(row)
    session.flush()
    session.add(JobEvent(job_id=job.id, attempt=job.attempt, level="info", type="message",
                         message=f"Evaluation {row.id} queued ({options.mode}, {options.n_samples} samples per task)",
                         data={"evaluation_id": row.id}))
    return row


def create_evaluation(
    *, session: Session, project: Project, job: Job, body: Any, enqueue: Callable[[str], None]
) -> Evaluation:
    """Evaluate a succeeded job's adapter: validate, store queued, commit, then `enqueue` the id."""
    if job.status != JobStatus.SUCCEEDED:
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
    return row_of_job(session=session, model=Evaluation, job=job, row_id=evaluation_id, noun="evaluation",
                      param="evaluation_id")
