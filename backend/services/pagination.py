"""Keyset pagination over a table's `seq`: `after=<id>` continues past that row, never with OFFSET."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from backend.services.errors import InvalidRequest
from backend.services.ids import looks_like_id

Row = TypeVar("Row")

MAX_PAGE_SIZE = 10_000


@dataclass
class Page(Generic[Row]):
    """One page of rows and whether more follow."""

    rows: list[Row]
    has_more: bool


def keyset_page(
    *,
    session: Session,
    query: Select[Any],
    model: Any,
    after: str | None,
    limit: int,
    descending: bool = True,
) -> Page[Any]:
    """Rows of `query` (already scoped to the caller) past the row whose id is `after`, `limit` at most."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE} (got {limit}).", param="limit")
    if after:
        # The cursor row is looked up inside the same scoped query, so another project's id finds nothing.
        cursor = None
        if looks_like_id(after):
            cursor = session.scalar(query.with_only_columns(model.seq).where(model.id == after))
        if cursor is None:
            raise InvalidRequest(f"No such object for after: {after[:100]}", param="after")
        query = query.where(model.seq < cursor if descending else model.seq > cursor)
    query = query.order_by(model.seq.desc() if descending else model.seq.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return Page(rows=rows[:limit], has_more=len(rows) > limit)
