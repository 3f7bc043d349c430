"""The attempt recorder across a database connection that drops after a commit went through.

A connection cut between COMMIT and its acknowledgement leaves the write stored while the worker sees an
error and retries: the retry must not store the event or checkpoint a second time (the reliability test
once saw step 4 reported twice). Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import Checkpoint, Job, Project
from backend.db.session import session_scope
from backend.training.events import TrainingEvent
from backend.workers import writes as recorder_module
from backend.workers.jobs.recorder import AttemptRecorder
from tests.workers.conftest import job_events


def _running_job() -> str:
    with session_scope() as session:
        project = Project(name=f"recorder-{uuid.uuid4().hex[:8]}")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="tiny-gpt2", training_file_id="file-x", hyperparameters={},
                  training={}, result_files=[], status="running", attempt=1)
        session.add(job)
        session.flush()
        return job.id


@pytest.fixture
def acknowledgement_lost_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next write commits, then its connection fails as if the answer to COMMIT never arrived."""
    failures: list[int] = []

    @contextmanager
    def flaky_scope() -> Iterator[Session]:
        with session_scope() as session:
            yield session
        if not failures:
            failures.append(1)
            raise OperationalError("COMMIT", {}, ConnectionResetError("server closed the connection"))

    monkeypatch.setattr(recorder_module, "session_scope", flaky_scope)
    return failures


@pytest.mark.parametrize("kind", ["metrics", "checkpoint", "message"])
def test_a_write_retried_after_a_lost_commit_answer_is_stored_once(
    reconciler_env: Settings, tmp_path: Path, acknowledgement_lost_once: list[int], kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = _running_job()
    recorder = AttemptRecorder(job_id, 1, data_dir=tmp_path, retry_seconds=10)
    data = {"step": 4, "path": str(tmp_path / "checkpoint-4")} if kind == "checkpoint" else {"step": 4}
    with caplog.at_level(logging.WARNING, logger=recorder_module.__name__):
        recorder.event(TrainingEvent(kind=kind, message="hello" if kind == "message" else "", data=data))  # type: ignore[arg-type]

    assert acknowledgement_lost_once == [1] and "database write failed" in caplog.text  # it did retry
    events = [event for event in job_events(job_id) if event.attempt == 1]
    assert len(events) == 1, [(event.type, event.message) for event in events]
    with session_scope() as session:
        checkpoints = list(session.scalars(select(Checkpoint.step_number).where(Checkpoint.job_id == job_id)))
    assert checkpoints == ([4] if kind == "checkpoint" else [])
