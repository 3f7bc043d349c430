"""Typed dependencies: the settings, one session per request, the authenticated project, a job of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session

from backend.api.schemas import Item, list_response
from backend.config import Settings
from backend.db.models import Job, Project
from backend.services import jobs as job_service
from backend.services.errors import ServiceError
from backend.services.keys import job_for_key, project_for_key
from backend.services.pagination import Page

Row = TypeVar("Row")


class Unauthorized(ServiceError):
    """No key, a wrong key, or a revoked key (401)."""

    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


async def get_settings_dep(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session for the request (made without I/O; it connects on first use, in a worker thread)."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        # Dependencies hand their connection back before their thread returns (release_connection), so this
        # close touches the database only after a route that read without committing: one local ROLLBACK.
        session.close()


def release_connection(session: Session) -> None:
    """End the read transaction so the pooled connection is free before this worker thread returns.

    Each sync dependency and route runs in its own thread-pool hop; a request holding a connection while
    it waits for the next hop could starve the pool and deadlock under load. Loaded objects stay usable
    (the session does not expire them on commit).
    """
    session.commit()


def page_response(session: Session, page: Page[Row], view: Callable[[Row], Item]) -> dict[str, Any]:
    """The list answer for one page of rows, each shown with `view`, after the connection is released."""
    release_connection(session)
    return list_response([view(row) for row in page.rows], has_more=page.has_more)


# Declares `Authorization: Bearer <key>` in the OpenAPI document (async, so it costs no thread hop); the key itself
# is checked by authenticate(), which answers 401 in the error envelope rather than FastAPI's own 403.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key from `safetrain keys create`.")
BEARER = Security(bearer_scheme)

SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]


def bearer_key(request: Request) -> str:
    """The key of the request's `Authorization: Bearer <key>`; 401 when there is none."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key: send it as `Authorization: Bearer <key>`.")
    return key.strip()


def authenticate(request: Request, session: Session) -> Project:
    """The project of the request's `Authorization: Bearer <key>`; 401 otherwise."""
    project = project_for_key(session, bearer_key(request))
    if project is None:
        raise Unauthorized("Incorrect or revoked API key.")
    return project


def get_project(request: Request, session: SessionDep) -> Project:
    """The authenticated project (one query, one thread hop)."""
    try:
        return authenticate(request, session)
    finally:
        release_connection(session)


ProjectDep = Annotated[Project, Depends(get_project)]


def job_for_project(
    fine_tuning_job_id: Annotated[str, Path(description="The job's id (ftjob-…).")],
    request: Request,
    session: SessionDep,
) -> Job:
    """The path's job if it belongs to the caller's project; 404 otherwise (never revealing other projects').

    It authenticates itself, so polling a job costs one thread hop and, when all is well, one query: status
    polling is the hot path.
    """
    try:
        job = job_for_key(session, bearer_key(request), fine_tuning_job_id)
        if job is not None:
            return job
        project = authenticate(request, session)
        return job_service.get_job(session=session, project=project, job_id=fine_tuning_job_id)
    finally:
        release_connection(session)


JobDep = Annotated[Job, Depends(job_for_project)]
