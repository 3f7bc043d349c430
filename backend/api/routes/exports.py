"""/v1/fine_tuning/jobs/{id}/exports: a succeeded job's adapter merged into its base, stored as a file."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query

from backend.api.deps import BEARER, JobDep, SessionDep, page_response, release_connection
from backend.api.schemas import ExportObject, ListResponse, error_responses
from backend.services import exports as export_service
from backend.services.export_runs import RUN_EXPORT
from backend.workers.dispatch import send

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["exports"], dependencies=[BEARER],
    responses=error_responses(400, 401, 404, 429, 503),
)

Limit = Annotated[int, Query(ge=1, le=10_000)]
ExportId = Annotated[str, Path(description="The export's id (ftexp-…).")]
# Documented, not parsed by FastAPI: the service checks the body after the job's state, naming the field at fault.
_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["format"],
    "properties": {"format": {"type": "string", "enum": list(export_service.EXPORT_FORMATS)}}}}}}}


def enqueue_export(export_id: str) -> None:
    """Send `safetrain.run_export` for a committed export."""
    send(RUN_EXPORT, export_id)


@router.post("/{fine_tuning_job_id}/exports", response_model=ExportObject, openapi_extra=_BODY,
             summary="Export a succeeded job's adapter merged into its base (16-bit safetensors)")
def create_export(job: JobDep, session: SessionDep, body: Annotated[Any, Body()] = None) -> ExportObject:
    """Validate, store as queued, commit, then send its id to the workers."""
    return ExportObject.of(export_service.create_export(session=session, job=job, body=body, enqueue=enqueue_export))


@router.get("/{fine_tuning_job_id}/exports", response_model=ListResponse[ExportObject], summary="List a job's exports")
def list_exports(job: JobDep, session: SessionDep, after: str | None = None, limit: Limit = 20) -> dict[str, Any]:
    """Newest first."""
    page = export_service.list_exports(session=session, job=job, after=after, limit=limit)
    return page_response(session, page, ExportObject.of)


@router.get("/{fine_tuning_job_id}/exports/{export_id}", response_model=ExportObject, summary="Retrieve an export")
def retrieve_export(job: JobDep, session: SessionDep, export_id: ExportId) -> ExportObject:
    """One export of the job."""
    row = export_service.get_export(session=session, job=job, export_id=export_id)
    release_connection(session)
    return ExportObject.of(row)


@router.post("/{fine_tuning_job_id}/exports/{export_id}/cancel", response_model=ExportObject,
             summary="Cancel an export")
def cancel_export(job: JobDep, session: SessionDep, export_id: ExportId) -> ExportObject:
    """A queued export is cancelled at once; a running one stops at its worker's next heartbeat."""
    return ExportObject.of(export_service.cancel_export(session=session, job=job, export_id=export_id))
