"""Keyset pagination over a table's `seq`: `after=<id>` continues past that row, never with OFFSET; and one row
of a job by its id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import Session

from backend.db.models import Evaluation, Export, Job
from backend.services.errors import InvalidRequest, NotFound
from backend.services.ids import looks_like_id

Row = TypeVar("Row")
JobRow = TypeVar("JobRow", Evaluation, Export)

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
    partition: tuple[Any, Any] | None = None,
) -> Page[Any]:
    """Rows of `query` (already scoped to the caller) past the row whose id is `after`, `limit` at most.

    `partition` (column, value) keeps only the rows whose column equals value, read through the (column, seq)
    index: pass the owner (a project, a job) this way rather than as `column == value` in `query`. Given that
    equality, PostgreSQL drops the column from ORDER BY and, expecting the owner's rows to be spread evenly over
    `seq`, may walk the primary key backward and filter: a project whose jobs are all older than another's
    then costs a scan of every newer row (100,000 jobs below 100,000 of another project: 25 ms a page, not
    0.1). So on PostgreSQL the column is bounded by a range, the cursor is one row-value bound on (column, seq)
    and the rows are ordered by (column, seq), which only that index yields in order. SQLite's planner picks
    the index for the equality, and would not start a range scan from a row value, so it keeps the equality.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE} (got {limit}).", param="limit")
    if partition is not None:
        column, value = partition
        if session.get_bind().dialect.name != "postgresql":
            query, partition = query.where(column == value), None
    cursor = None
    if after:
        # The cursor row is looked up inside the same scoped query, so another project's id finds nothing.
        if looks_like_id(after):
            lookup = query.with_only_columns(model.seq).where(model.id == after)
            cursor = session.scalar(lookup if partition is None else lookup.where(column == value))
        if cursor is None:
            raise InvalidRequest(f"No such object for after: {after[:100]}", param="after")
    if partition is None:
        if cursor is not None:
            query = query.where(model.seq < cursor if descending else model.seq > cursor)
        order = [model.seq]
    else:
        if cursor is None:
            query = query.where(column >= value, column <= value)
        elif descending:
            query = query.where(tuple_(column, model.seq) < tuple_(value, cursor), column >= value)
        else:
            query = query.where(tuple_(column, model.seq) > tuple_(value, cursor), column <= value)
        order = [column, model.seq]
    query = query.order_by(*(key.desc() if descending else key.asc() for key in order)).limit(limit + 1)
    rows = list(session.scalars(query))
    return Page(rows=rows[:limit], has_more=len(rows) > limit)


def row_of_job(*, session: Session, model: type[JobRow], job: Job, row_id: str, noun: str, param: str) -> JobRow:
    """The `model` row `row_id` of the job (in its project), or NotFound naming the `noun`."""
    row = None
    if looks_like_id(row_id):
        row = session.scalar(select(model).where(
            model.id == row_id, model.job_id == job.id, model.project_id == job.project_id))
    if row is None:
        raise NotFound(f"No such {noun}: {row_id[:100]}", param=param)
    return row
