"""The evaluation path's fixture: a migrated SQLite database with a succeeded job, its adapter archive and an
evals file (the silent model's, from tests/evaluation/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.config import Settings
from backend.db.migrations import upgrade_to_head
from backend.db.models import Artifact, File, Job, Project
from backend.db.session import make_engine, session_scope, set_engine
from backend.services.storage import hash_file
from backend.workers.adapter_archive import archive_adapter
from tests.evaluation import conftest as evaluation_fixtures
from tests.evaluation.conftest import SOLVED, UNSOLVED

# The silent model and its adapter, shared with tests/evaluation (fixtures are found by name in a conftest).
silent_model_dir = evaluation_fixtures.silent_model_dir
silent_adapter_dir = evaluation_fixtures.silent_adapter_dir


@dataclass
class Stored:
    settings: Settings
    job_id: str
    adapter_path: Path
    adapter_dir: Path


@pytest.fixture()
def stored(tmp_path: Path, silent_model_dir: Path, silent_adapter_dir: Path) -> Iterator[Stored]:
    """A migrated SQLite database with a succeeded job of the silent model, its adapter archive and an evals file."""
    settings = Settings(data_dir=tmp_path / "var", models_dir=silent_model_dir.parent,
                        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_seconds=1)
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    set_engine(engine)
    archive = settings.data_dir / "artifacts" / "job" / "adapter.zip"
    archive_adapter(silent_adapter_dir, archive, extra_manifest={"base_model_name": silent_model_dir.name})
    evals = settings.data_dir / "files" / "evals.jsonl"
    evals.parent.mkdir(parents=True)
    evals.write_text("".join(json.dumps(task) + "\n" for task in (SOLVED, UNSOLVED)))
    sha256, size = hash_file(archive)
    with session_scope() as session:
        project = Project(name="p")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model=silent_model_dir.name, training_file_id="file-x", status="succeeded",
                  attempt=1)
        session.add(job)
        session.add(File(id="file-evals", project_id=project.id, filename="evals.jsonl", purpose="evals", bytes=1,
                         sha256="0" * 64, path="files/evals.jsonl"))
        session.add(File(id="file-adapter", project_id=project.id, filename="a.zip", purpose="fine-tune-results",
                         bytes=size, sha256=sha256, path="artifacts/job/adapter.zip"))
        session.flush()
        session.add(Artifact(job_id=job.id, file_id="file-adapter", path="artifacts/job/adapter.zip", sha256=sha256,
                             bytes=size))
        job_id = job.id
    try:
        yield Stored(settings, job_id, archive, silent_adapter_dir)
    finally:
        set_engine(None)
        engine.dispose()
