"""Merged-model exports of a job's adapter: the request, its rows and cancel.

A worker claims the row and merges the adapter into its base through backend/services/export_runs.py; the
merged model folder is stored as a file of its own, which the export's `file_id` names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.db.models import Export, Job, JobEvent, now
from backend.db.statuses import ExportStatus, JobStatus
from backend.services.errors import InvalidRequest
from backend.services.pagination import Page, keyset_page, row_of_job

EXPORT_FORMATS = ("merged",)
FINISHED_EXPORT_STATUSES = frozenset({ExportStatus.SUCCEEDED, ExportStatus.FAILED, ExportStatus.CANCELLED})


def _export_format(body: Any) -> str:
    """The body's `format`, refused (400 naming `format`) unless it is one safetrain exports."""
    value = body.get("format") if isinstance(body, dict) else None
    if value not in EXPORT_FORMATS:
        shown = repr(value)[:100]
        raise InvalidRequest(
            f"format must be one of {', '.join(EXPORT_FORMATS)} (got {shown}); GGUF is not made here: convert the "
            "merged folder with llama.cpp's convert_hf_to_gguf.py.", param="format")
    return str(value)


def create_export(*, session: Session, job: Job, body: Any, enqueue: Callable[[str], None]) -> Export:
    """Export a succeeded job's adapter merged into its base: validate, store queued, commit, then `enqueue`."""
    if job.status != JobStatus.SUCCEEDED:
        raise InvalidRequest(f"Job {job.id} is {job.status}: only a succeeded job's adapter can be exported.",
                             param="fine_tuning_job_id")
    export_format = _export_format(body)
    row = Export(job_id=job.id, project_id=job.project_id, format=export_format, status=ExportStatus.QUEUED)
    session.add(row)
    session.flush()
    session.add(JobEvent(job_id=job.id, attempt=job.attempt, level="info", type="message",
                         message=f"Export {row.id} queued ({export_format})", data={"export_id": row.id}))
    session.commit()
    enqueue(row.id)
    return row


def list_exports(*, session: Session, job: Job, after: str | None, limit: int) -> Page[Export]:
    """The job's exports, newest first."""
    query = select(Export).where(Export.project_id == job.project_id)
    return keyset_page(session=session, query=query, model=Export, after=after, limit=limit,
                       partition=(Export.job_id, job.id))


def get_export(*, session: Session, job: Job, export_id: str) -> Export:
    """One export of the job, or NotFound."""
    return row_of_job(session=session, model=Export, job=job, row_id=export_id, noun="export", param="export_id")


def cancel_export(*, session: Session, job: Job, export_id: str) -> Export:
    """Cancel: a queued export at once; a running one through its worker (its next heartbeat stops the merge)."""
    row = get_export(session=session, job=job, export_id=export_id)
    for _ in range(3):
        if row.status in FINISHED_EXPORT_STATUSES:
            raise InvalidRequest(f"Cannot cancel export {row.id}: it has already {row.status}.", param="export_id")
        if row.status == ExportStatus.QUEUED:
            values: dict[str, Any] = {"status": ExportStatus.CANCELLED, "finished_at": now()}
        else:
            values = {"requested_action": "cancel"}
        changed = session.execute(update(Export).where(Export.id == row.id, Export.status == row.status)
                                  .values(**values).execution_options(synchronize_session=False)
                                  ).rowcount  # type: ignore[attr-defined]
        session.refresh(row)
        if changed:
            session.add(JobEvent(job_id=job.id, attempt=job.attempt, level="info", type="message",
                                 message=f"Export {row.id}: cancellation requested" if row.requested_action
                                 else f"Export {row.id} cancelled", data={"export_id": row.id}))
            session.commit()
            return row
    raise InvalidRequest(f"Export {row.id} changed state while cancelling; try again.", param="export_id")
