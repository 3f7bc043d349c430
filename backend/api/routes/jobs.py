"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events (and SSE), checkpoints, telemetry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy import select
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from backend.api.deps import BEARER, JobDep, ProjectDep, SessionDep, SettingsDep, release_connection
from backend.api.schemas import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    ListResponse,
    TelemetryList,
    TelemetrySampleOut,
    error_responses,
    list_response,
)
from backend.db.models import TERMINAL_JOB_STATUSES, Job
from backend.services import jobs as job_service
from backend.services.errors import InvalidRequest
from backend.services.job_queue import list_jobs_with_status, parse_statuses
from backend.services.job_request import JobCreateRequest
from backend.workers.dispatch import enqueue_job

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["fine-tuning jobs"], dependencies=[BEARER],
    responses=error_responses(400, 401, 404, 429, 503),
)

STREAM_POLL_SECONDS = 0.5
MAX_SEQ = 2**63 - 1  # sequence numbers are 64-bit: a larger cursor would overflow the database's integer
Limit = Annotated[int, Query(ge=1, le=10_000)]


@router.post("", response_model=FineTuningJob, summary="Create a fine-tuning job")
def create_job(
    body: JobCreateRequest, session: SessionDep, settings: SettingsDep, project: ProjectDep
) -> FineTuningJob:
    """Validate, store as queued, commit, then enqueue the job's id."""
    job = job_service.create_job(session=session, settings=settings, project=project, spec=body, enqueue=enqueue_job)
    return FineTuningJob.of(job)


def _metadata_filter(request: Request) -> dict[str, str]:
    """`metadata[k]=v` query parameters as a dict."""
    found = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]") and len(key) > len("metadata[]"):
            found[key[len("metadata[") : -1]] = value
        elif key.startswith("metadata"):
            raise InvalidRequest("Filter by metadata as metadata[key]=value.", param=key)
    return found


@router.get("", response_model=ListResponse[FineTuningJob], summary="List fine-tuning jobs")
def list_jobs(
    request: Request, session: SessionDep, project: ProjectDep, after: str | None = None, limit: Limit = 20,
    status: Annotated[str | None, Query(description="Only jobs in these statuses: `queued`, `running,paused`.")] = None,
) -> dict[str, Any]:
    """The project's jobs, newest first; `metadata[k]=v` keeps those whose metadata holds the pair."""
    if status is None:
        page = job_service.list_jobs(
            session=session, project=project, after=after, limit=limit, metadata=_metadata_filter(request)
        )
    else:
        page = list_jobs_with_status(
            session=session, project=project, statuses=parse_statuses(status), after=after, limit=limit,
            metadata=_metadata_filter(request),
        )
    release_connection(session)
    return list_response([FineTuningJob.of(job) for job in page.rows], has_more=page.has_more)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob, summary="Retrieve a fine-tuning job")
async def retrieve_job(job: JobDep) -> Response:
    """One job of the project (async: the row is loaded, shaping it needs no thread)."""
    # Status polling is the hot path: serialize once instead of letting FastAPI re-validate the model.
    return Response(FineTuningJob.of(job).model_dump_json(), media_type="application/json")


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, summary="Cancel a job")
def cancel_job(job: JobDep, session: SessionDep) -> FineTuningJob:
    """A queued job is cancelled at once; a running one stops at its next step and frees the GPU."""
    return FineTuningJob.of(job_service.cancel_job(session=session, job=job))


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob, summary="Pause a job")
def pause_job(job: JobDep, session: SessionDep) -> FineTuningJob:
    """A running job checkpoints and stops (status `paused`); a queued one waits, paused."""
    return FineTuningJob.of(job_service.pause_job(session=session, job=job))


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob, summary="Resume a paused job")
def resume_job(job: JobDep, session: SessionDep, settings: SettingsDep, project: ProjectDep) -> FineTuningJob:
    """Re-queue a paused job; it continues from its last complete checkpoint."""
    resumed = job_service.resume_job(session=session, settings=settings, project=project, job=job, enqueue=enqueue_job)
    return FineTuningJob.of(resumed)


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=ListResponse[FineTuningJobEvent],
    summary="List a job's events (or stream them as Server-Sent Events with ?stream=true)",
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
def list_events(
    request: Request,
    job: JobDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
    stream: bool = False,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    """Newest first; with `stream=true`, oldest first as SSE (`id:` = event number) until the job ends."""
    if stream:
        start = _last_event_number(last_event_id)
        return EventSourceResponse(_event_stream(request, job.id, start), ping=15)
    page = job_service.list_events(session=session, job=job, after=after, limit=limit)
    release_connection(session)
    return list_response([FineTuningJobEvent.of(row) for row in page.rows], has_more=page.has_more)


def _last_event_number(header: str | None) -> int:
    if header is None or header == "":
        return 0
    if not header.isdigit() or len(header) > 19 or int(header) > MAX_SEQ:
        raise InvalidRequest("Last-Event-ID must be the number of an event.", param="Last-Event-ID")
    return int(header)


async def _event_stream(request: Request, job_id: str, after_seq: int) -> AsyncIterator[dict[str, str]]:
    """Events after `after_seq` as they are written; ends with `event: done` once the job is finished."""
    factory = request.app.state.session_factory

    def poll(seq: int) -> tuple[str | None, list[tuple[int, str]]]:
        with factory() as session:
            # Status first: if it was finished before the events were read, no event can follow those read.
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            rows = job_service.events_since(session=session, job_id=job_id, seq=seq)
            return status, [(row.seq, FineTuningJobEvent.of(row).model_dump_json()) for row in rows]

    while True:
        status, rows = await run_in_threadpool(poll, after_seq)
        for seq, data in rows:
            yield {"id": str(seq), "event": "message", "data": data}
            after_seq = seq
        if rows:
            continue
        if status is None or status in TERMINAL_JOB_STATUSES:
            yield {"event": "done", "data": "[DONE]"}
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(STREAM_POLL_SECONDS)


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    response_model=ListResponse[FineTuningJobCheckpoint],
    summary="List a job's checkpoints",
)
def list_checkpoints(
    job: JobDep, session: SessionDep, project: ProjectDep, after: str | None = None, limit: Limit = 10
) -> dict[str, Any]:
    """Complete checkpoints, newest first."""
    page = job_service.list_checkpoints(session=session, job=job, after=after, limit=limit)
    release_connection(session)
    items = [FineTuningJobCheckpoint.of(row, job=job, project=project) for row in page.rows]
    return list_response(items, has_more=page.has_more)


@router.get("/{fine_tuning_job_id}/telemetry", response_model=TelemetryList, summary="A job's memory samples")
def list_telemetry(
    job: JobDep,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ, description="Continue after this sample number (last_seq).")] = 0,
    limit: Limit = 1000,
) -> TelemetryList:
    """Per-GPU used/total, torch allocated/reserved/peak and process RSS over time, oldest first."""
    page = job_service.list_telemetry(session=session, job=job, after_seq=after, limit=limit)
    release_connection(session)
    data = [TelemetrySampleOut.of(row) for row in page.rows]
    return TelemetryList(data=data, has_more=page.has_more, last_seq=data[-1].seq if data else None)
