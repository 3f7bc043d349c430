"""POST /v1/fine_tuning/estimate: the memory plan of a job before anything loads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from backend.api.deps import BEARER, ProjectDep, SettingsDep
from backend.api.schemas import error_responses
from backend.services.estimates import estimate_job
from backend.services.job_request import EstimateRequest

router = APIRouter(
    prefix="/v1/fine_tuning", tags=["fine-tuning jobs"], dependencies=[BEARER],
    responses=error_responses(400, 401, 429, 503),
)


@router.post("/estimate", summary="Plan a job's peak memory and the cheapest settings that fit")
def estimate(body: EstimateRequest, settings: SettingsDep, project: ProjectDep) -> dict[str, Any]:
    """`{fits, estimate_bytes, budget_bytes, device, breakdown, max_seq_length, techniques}` from the config alone."""
    return estimate_job(settings=settings, spec=body)
