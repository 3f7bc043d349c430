"""API keys: random secrets shown once, stored as sha256 hashes, scoped to one project."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import ApiKey, Job, Project, now
from backend.db.session import session_scope
from backend.services.ids import looks_like_id

KEY_PREFIX = "sk-st-"


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def get_or_create_project(*, session: Session, name: str) -> Project:
    """The project called `name`, created when new."""
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_key(*, session: Session, project: Project) -> str:
    """A new key for `project`; only its hash is stored, so this is the one time it is seen."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(project_id=project.id, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + 8]))
    session.flush()
    return key


def create_key_for_project_name(name: str) -> str:
    """`safetrain keys create --project NAME`: a new key for the project, created if new."""
    if not name.strip():
        raise ValueError("the project name must not be empty")
    with session_scope() as session:
        return create_key(session=session, project=get_or_create_project(session=session, name=name.strip()))


def revoke_key(*, session: Session, key: str) -> bool:
    """Revoke `key`; False when no such active key exists."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        return False
    row.revoked_at = now()
    return True


def revoke_key_by_value(key: str) -> None:
    """`safetrain keys revoke KEY`: the key stops working at once."""
    with session_scope() as session:
        if not revoke_key(session=session, key=key):
            raise ValueError("no active API key matches")


def project_for_key(session: Session, key: str) -> Project | None:
    """The project an active key belongs to, or None (one query)."""
    digest = hash_key(key)
    row = session.execute(
        select(ApiKey.key_hash, ApiKey.revoked_at, Project)
        .join(Project, Project.id == ApiKey.project_id)
        .where(ApiKey.key_hash == digest)
    ).first()
    # The lookup is by hash; the constant-time compare keeps the final check free of timing leaks.
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        return None
    project: Project = row.Project
    return project


def job_for_key(session: Session, key: str, job_id: str) -> Job | None:
    """The job `job_id` if `key` is an active key of the job's project; None otherwise, whatever the reason.

    One query where authenticate-then-load costs two: status polling is the service's hot path. A None sends
    the caller down the two-query path, which tells a bad key (401) from another project's job (404).
    """
    if not looks_like_id(job_id):
        return None
    digest = hash_key(key)
    row = session.execute(
        select(ApiKey.key_hash, ApiKey.revoked_at, Job)
        .join(Job, Job.project_id == ApiKey.project_id)
        .where(ApiKey.key_hash == digest, Job.id == job_id)
    ).first()
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        return None
    job: Job = row.Job
    return job
