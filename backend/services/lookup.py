"""One project's row by its public id: malformed ids never reach a query, other projects' rows read as absent."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import File, Job
from backend.services.errors import ServiceError
from backend.services.ids import looks_like_id

OwnedRow = TypeVar("OwnedRow", File, Job)


def project_row(
    *, session: Session, model: type[OwnedRow], row_id: str, project_id: str, missing: ServiceError
) -> OwnedRow:
    """The project's `model` row whose id is `row_id`; raises `missing` when there is none."""
    row = None
    if looks_like_id(row_id):
        row = session.scalar(select(model).where(model.id == row_id, model.project_id == project_id))
    if row is None:
        raise missing
    return row
