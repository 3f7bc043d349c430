"""Per-project quotas are checked and spent under a lock on the project's row, so concurrent requests of one
project cannot all pass the same check, while other projects' requests never wait for it (PostgreSQL locks the
row; SQLite has one writer at a time anyway)."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.db.models import Project


def lock_project(*, session: Session, project_id: str) -> None:
    """Start a fresh transaction holding the project's row lock until the caller commits or rolls back.

    The read transaction before it ends first (nothing is written before a quota check): on SQLite a transaction
    that read and then writes after another writer committed fails at once instead of waiting its turn.
    """
    session.commit()
    statement = update(Project).where(Project.id == project_id).values(id=Project.id)
    session.execute(statement.execution_options(synchronize_session=False))
