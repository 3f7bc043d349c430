"""/v1/fine_tuning/jobs/{id}/evaluations: sandboxed code evaluations of a succeeded job's adapter."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query

from backend.api.deps import BEARER, JobDep, ProjectDep, SessionDep, page_response, release_connection
from backend.api.evaluation_schemas import EvaluationObject
from backend.api.schemas import ListResponse, error_responses
from backend.services import evaluations as evaluation_service
from backend.services.evaluation_options import EvaluationOptions
from backend.workers.dispatch import enqueue_evaluation

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["evaluations"], dependencies=[BEARER],
    responses=error_responses(400, 401, 404, 429, 503),
)

Limit = Annotated[int, Query(ge=1, le=10_000)]
# Documented, not parsed by FastAPI: the service checks the body after the job's state, naming the field at fault.
_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": EvaluationOptions.model_json_schema()}}}}


@router.post("/{fine_tuning_job_id}/evaluations", response_model=EvaluationObject,
             summary="Evaluate a succeeded job's adapter on coding tasks (sandboxed)", openapi_extra=_BODY)
def create_evaluation(
    job: JobDep, session: SessionDep, project: ProjectDep, body: Annotated[Any, Body()] = None
) -> EvaluationObject:
    """Validate, store as queued, commit, then send its id to the workers."""
    row = evaluation_service.create_evaluation(session=session, project=project, job=job, body=body,
                                               enqueue=enqueue_evaluation)
    return EvaluationObject.of(row)


@router.get("/{fine_tuning_job_id}/evaluations", response_model=ListResponse[EvaluationObject],
            summary="List a job's evaluations")
def list_evaluations(job: JobDep, session: SessionDep, after: str | None = None, limit: Limit = 20) -> dict[str, Any]:
    """Newest first."""
    page = evaluation_service.list_evaluations(session=session, job=job, after=after, limit=limit)
    return page_response(session, page, EvaluationObject.of)


@router.get("/{fine_tuning_job_id}/evaluations/{evaluation_id}", response_model=EvaluationObject,
            summary="Retrieve an evaluation")
def retrieve_evaluation(
    job: JobDep, session: SessionDep,
    evaluation_id: Annotated[str, Path(description="The evaluation's id (fteval-…).")],
) -> EvaluationObject:
    """One evaluation of the job."""
    row = evaluation_service.get_evaluation(session=session, job=job, evaluation_id=evaluation_id)
    release_connection(session)
    return EvaluationObject.of(row)
