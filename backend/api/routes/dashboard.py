"""The dashboard's static files at `/` and `/dashboard/...`, and `GET /v1/fine_tuning/queue`, the one view it
needed that the API lacked (queued jobs in order, and which worker and device run the project's jobs)."""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import FileResponse, Response

from backend.api.deps import BEARER, ProjectDep, SessionDep, release_connection
from backend.api.schemas import Progress, error_responses
from backend.db.models import Job
from backend.services.errors import NotFound
from backend.services.job_queue import queue_view

STATIC_DIR = Path(__file__).resolve().parents[2] / "dashboard" / "static"
# No inline script or style, nothing from another origin; the API key travels only in fetch() headers.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidated by ETag: a new release is picked up at once
}
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("image/svg+xml", ".svg")

router = APIRouter(tags=["dashboard"], include_in_schema=False)
queue_router = APIRouter(
    prefix="/v1/fine_tuning", tags=["fine-tuning jobs"], dependencies=[BEARER],
    responses=error_responses(401, 503),
)


def _static_files() -> dict[str, tuple[Path, str]]:
    """Every shipped file by its path under the static folder, with an ETag of its content: only these are served."""
    return {
        path.relative_to(STATIC_DIR).as_posix(): (path, f'"{hashlib.sha256(path.read_bytes()).hexdigest()[:20]}"')
        for path in STATIC_DIR.rglob("*")
        if path.is_file()
    }


STATIC_FILES = _static_files()


def _static(request: Request, name: str) -> Response:
    found = STATIC_FILES.get(name)
    if found is None:
        raise NotFound(f"No such dashboard file: {name[:100]}")
    path, etag = found
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0], headers=headers)


@router.api_route("/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    """The dashboard's single page."""
    return _static(request, "index.html")


@router.api_route("/dashboard/{name:path}", methods=["GET", "HEAD"])
async def asset(request: Request, name: str) -> Response:
    """A script, stylesheet or icon of the dashboard."""
    return _static(request, name)


class QueueEntry(BaseModel):
    """A job as the queue shows it: where it waits, or which worker and device run it."""

    id: str
    object: Literal["fine_tuning.queue.entry"] = "fine_tuning.queue.entry"
    status: str
    model: str
    user_provided_suffix: str | None
    created_at: int
    started_at: int | None
    position: int | None
    worker: str | None
    device: str | None
    progress: Progress

    @classmethod
    def of(cls, job: Job, position: int | None = None) -> QueueEntry:
        """The queue's view of a job row."""
        return cls(
            id=job.id, status=job.status, model=job.model, user_provided_suffix=job.suffix,
            created_at=job.created_at, started_at=job.started_at, position=position,
            worker=job.worker if position is None else None, device=job.memory_device if position is None else None,
            progress=Progress(step=job.progress_step, total_steps=job.progress_total_steps, epoch=job.progress_epoch),
        )


class Queue(BaseModel):
    """The project's running jobs, its queued jobs in the order workers take them, and the queue's length."""

    object: Literal["fine_tuning.queue"] = "fine_tuning.queue"
    running: list[QueueEntry]
    queued: list[QueueEntry]
    queued_total: int


@queue_router.get("/queue", response_model=Queue, summary="The queue: waiting jobs in order, and who runs what")
def get_queue(session: SessionDep, project: ProjectDep) -> Queue:
    """Running jobs with their worker and device; queued ones with their place among every project's queued jobs."""
    view = queue_view(session=session, project=project)
    release_connection(session)
    return Queue(
        running=[QueueEntry.of(job) for job in view.running],
        queued=[QueueEntry.of(entry.job, entry.position) for entry in view.queued],
        queued_total=view.queued_total,
    )
