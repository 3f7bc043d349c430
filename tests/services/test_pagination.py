"""Job listing pages: one project's jobs only, newest first, read through the (project_id, seq) index."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import event, insert, select, text
from sqlalchemy.orm import Session

from backend.db.models import Job, Project
from backend.services.errors import InvalidRequest
from backend.services.jobs import list_jobs
from backend.services.keys import get_or_create_project
from backend.services.pagination import keyset_page


def _add_jobs(session: Session, project: Project, count: int, batch: int = 0) -> None:
    rows = [
        {"project_id": project.id, "model": "tiny-gpt2", "training_file_id": "file-x", "metadata_": {"n": str(i % 3)}}
        for i in range(batch, batch + count)
    ]
    session.execute(insert(Job), rows)
    session.commit()


def _ids(session: Session, project: Project) -> list[str]:
    return list(session.scalars(select(Job.id).where(Job.project_id == project.id).order_by(Job.seq.desc())))


def _walk(session: Session, project: Project, limit: int, metadata: dict[str, str] | None = None) -> list[str]:
    seen: list[str] = []
    after = None
    while True:
        page = list_jobs(session=session, project=project, after=after, limit=limit, metadata=metadata)
        seen += [job.id for job in page.rows]
        if not page.has_more:
            return seen
        after = seen[-1]


def test_pages_walk_one_projects_jobs_newest_first(session: Session) -> None:
    a = get_or_create_project(session=session, name="a")
    b = get_or_create_project(session=session, name="b")
    for batch in range(0, 40, 4):  # interleaved, then a run of b's jobs newer than all of a's
        _add_jobs(session, a, 4, batch)
        _add_jobs(session, b, 4, batch)
    _add_jobs(session, b, 30)
    a_ids = _ids(session, a)
    assert len(a_ids) == 40 and _walk(session, a, limit=7) == a_ids == _walk(session, a, limit=40)
    assert _walk(session, b, limit=9) == _ids(session, b)
    with_n1 = [job.id for job in session.scalars(select(Job).where(Job.project_id == a.id).order_by(Job.seq.desc()))
               if job.metadata_ == {"n": "1"}]
    assert _walk(session, a, limit=3, metadata={"n": "1"}) == with_n1 and len(with_n1) == 13
    # Oldest first, past a cursor, through keyset_page itself.
    oldest = keyset_page(session=session, query=select(Job), model=Job, after=a_ids[-5], limit=3, descending=False,
                         partition=(Job.project_id, a.id))
    assert [job.id for job in oldest.rows] == a_ids[-6:-9:-1] and oldest.has_more
    last = list_jobs(session=session, project=a, after=a_ids[-2], limit=5)
    assert [job.id for job in last.rows] == a_ids[-1:] and not last.has_more
    # Another project's job is no cursor here.
    with pytest.raises(InvalidRequest) as refused:
        list_jobs(session=session, project=a, after=_ids(session, b)[3], limit=5)
    assert refused.value.param == "after"


def _plan(session: Session, sql: str, params: Any) -> str:
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        plan = connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params).scalar_one()
        return json.dumps(plan)
    return " | ".join(str(row[-1]) for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params))


def test_the_page_query_reads_the_project_index_even_when_another_project_is_newer(session: Session) -> None:
    # Every job of `old` is older than every job of `new`: PostgreSQL, expecting a project's rows spread evenly,
    # walked the primary key backward through all of `new`'s rows for `old`'s first page.
    old = get_or_create_project(session=session, name="old")
    new = get_or_create_project(session=session, name="new")
    _add_jobs(session, old, 2000)
    _add_jobs(session, new, 2000)
    session.execute(text("ANALYZE jobs" if session.get_bind().dialect.name == "postgresql" else "ANALYZE"))
    session.commit()
    deep = _ids(session, old)[1000]
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        statements.append((sql, params))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", record)
    try:
        # (A metadata filter may rightly read a table this small whole: its JSON is not indexed.)
        for after in (None, deep):
            statements.clear()
            page = list_jobs(session=session, project=old, after=after, limit=20)
            assert len(page.rows) == 20 and page.has_more
            sql, params = statements[-1]
            plan = _plan(session, sql, params)
            assert "ix_jobs_project_id_seq" in plan, plan
            for wrong in ("Seq Scan", "Sort", "pk_jobs", "TEMP B-TREE", "SCAN jobs"):
                assert wrong not in plan, plan
    finally:
        event.remove(engine, "before_cursor_execute", record)
