"""Sandboxed code evaluations of a job's adapter: the request and its rows.

An evaluation either follows training (the job's `evaluation` option: its row is written with the job and
sent to the workers once the job succeeds) or is asked for on a succeeded job. Either way a worker claims
the row and records its results through backend/services/evaluation_runs.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Evaluation, File, Job, JobEvent, Project
from backend.db.statuses import EvaluationStatus, JobStatus
from backend.services.errors import InvalidRequest, NotFound
from backend.services.ids import looks_like_id
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
    row = None
    if looks_like_id(evaluation_id):
        row = session.scalar(select(Evaluation).where(
            Evaluation.id == evaluation_id, Evaluation.job_id == job.id, Evaluation.project_id == job.project_id))
    if row is None:
        raise NotFound(f"No such evaluation: {evaluation_id[:100]}", param="evaluation_id")
    return row
