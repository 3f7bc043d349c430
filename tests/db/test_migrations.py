"""Alembic builds exactly the models' schema, on SQLite and PostgreSQL, and takes it down again."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

from backend.db.migrations import downgrade_to_base, upgrade_to_head
from backend.db.models import Base, Job, JobEvent, Project
from backend.db.session import make_engine

TABLES = {"projects", "api_keys", "files", "jobs", "job_events", "checkpoints", "telemetry_samples", "artifacts"}


def test_migrations_match_the_models(db_engine: Engine) -> None:
    assert set(inspect(db_engine).get_table_names()) >= TABLES
    with db_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_then_upgrade_round_trips(database_url: str, db_engine: Engine) -> None:
    engine = make_engine(database_url)
    try:
        downgrade_to_base(engine)
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade_to_head(engine)
        upgrade_to_head(engine)  # idempotent at head
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_sequence_numbers_grow_and_ids_are_random(db_engine: Engine) -> None:
    with Session(db_engine) as session:
        project = Project(name="p")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="m", training_file_id="file-x")
        session.add(job)
        session.flush()
        events = [JobEvent(job_id=job.id, message=str(n)) for n in range(5)]
        session.add_all(events)
        session.commit()
        seqs = list(session.scalars(select(JobEvent.seq).order_by(JobEvent.id)))
        assert sorted(seqs) == list(range(min(seqs), min(seqs) + 5))
        assert all(event.id.startswith("ftevent-") and len(event.id) > 20 for event in events)
        assert len({event.id for event in events}) == 5


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    engine.dispose()
