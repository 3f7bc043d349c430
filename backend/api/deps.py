"""Typed dependencies: the settings, one session per request, the authenticated project, a job of it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import Job, Project
from backend.services import jobs as job_service
from backend.services.errors import ServiceError
from backend.services.keys import project_for_key


class Unauthorized(ServiceError):
    """No key, a wrong key, or a revoked key (401)."""

    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


def get_settings_dep(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session for the request, closed (rolled back if uncommitted) at its end."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]


def get_project(request: Request, session: SessionDep) -> Project:
    """The project of the request's `Authorization: Bearer <key>`; 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key: send it as `Authorization: Bearer <key>`.")
    project = project_for_key(session, key.strip())
    if project is None:
        raise Unauthorized("Incorrect or revoked API key.")
    request.state.project_id = project.id
    return project


ProjectDep = Annotated[Project, Depends(get_project)]


def job_for_project(
    fine_tuning_job_id: Annotated[str, Path(description="The job's id (ftjob-…).")],
    session: SessionDep,
    project: ProjectDep,
) -> Job:
    """The path's job if it belongs to the caller's project; 404 otherwise (never revealing other projects')."""
    return job_service.get_job(session=session, project=project, job_id=fine_tuning_job_id)


JobDep = Annotated[Job, Depends(job_for_project)]
