"""What the queue looks like to a project, and jobs filtered by status."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import JOB_STATUSES, Job, Project
from backend.db.statuses import JobStatus
from backend.services.errors import InvalidRequest
from backend.services.pagination import Page, keyset_page

# The statuses in which a job holds a worker.
RUNNING_STATUSES = (JobStatus.VALIDATING_FILES, JobStatus.RUNNING)
MAX_QUEUED_SHOWN = 200


@dataclass
class QueuedJob:
    """A queued job of the project and its place among every queued job of the deployment (1 = next)."""

    job: Job
    position: int


@dataclass
class QueueView:
    """The project's jobs holding a worker, its queued jobs in the order they wait, and the queue's length."""

    running: list[Job]
    queued: list[QueuedJob]
    queued_total: int


def parse_statuses(raw: str) -> list[str]:
    """`queued` or `queued,running` as a list of statuses; 400 naming `status` for an unknown one."""
    statuses = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [status for status in statuses if status not in JOB_STATUSES]
    if not statuses or unknown:
        raise InvalidRequest(
            f"status must be one or more of {', '.join(JOB_STATUSES)}, comma-separated.", param="status"
        )
    return statuses


def list_jobs_with_status(
    *, session: Session, project: Project, statuses: list[str], after: str | None, limit: int,
    metadata: dict[str, str] | None = None,
) -> Page[Job]:
    """The project's jobs in one of `statuses`, newest first (keyset pages, as the unfiltered list)."""
    query = select(Job).where(Job.status.in_(statuses))
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].as_string() == value)
    return keyset_page(
        session=session, query=query, model=Job, after=after, limit=limit, partition=(Job.project_id, project.id)
    )


def queue_view(*, session: Session, project: Project) -> QueueView:
    """Running jobs of the project (with their worker and device) and its queued ones, oldest first.

    Positions count every project's queued jobs (only their number is revealed, never which they are):
    workers take jobs in the order they were queued.
    """
    running = list(
        session.scalars(
            select(Job)
            .where(Job.project_id == project.id, Job.status.in_(RUNNING_STATUSES))
            .order_by(Job.seq.asc())
        )
    )
    queued = select(Job.seq, Job.project_id).where(Job.status == JobStatus.QUEUED).order_by(Job.seq)
    waiting = list(session.execute(queued))
    positions = {seq: index for index, (seq, owner) in enumerate(waiting, start=1) if owner == project.id}
    shown = list(positions)[:MAX_QUEUED_SHOWN]
    own = list(session.scalars(select(Job).where(Job.seq.in_(shown)).order_by(Job.seq))) if shown else []
    return QueueView(
        running=running, queued=[QueuedJob(job, positions[job.seq]) for job in own], queued_total=len(waiting)
    )
