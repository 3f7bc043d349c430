"""Fixtures for the hostile-input tests: the real app on SQLite and PostgreSQL, two projects, and a snapshot of
everything stored (row counts, files on disk with their sha256, the sha256s recorded in the files table) so each
attack can assert that nothing changed and that the service still answers afterwards."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import Base, File
from tests.api.conftest import GOOD_CHAT, app, bearer, client, key_a, key_b, make_key, upload
from tests.support.network import served

# The API suite's fixtures (the app, a client, two projects' keys, an uploader), shared rather than copied.
__all__ = ["GOOD_CHAT", "app", "bearer", "client", "key_a", "key_b", "make_key", "upload"]


@dataclass(frozen=True)
class Stored:
    """Everything the service keeps: rows per table, bytes on disk, and the hashes the files table records."""

    rows: dict[str, int]
    disk: dict[str, str]
    recorded: dict[str, tuple[str, int]]


def _disk(data_dir: Path) -> dict[str, str]:
    if not data_dir.exists():
        return {}
    return {
        str(path.relative_to(data_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file()
    }


def snapshot_of(engine: Engine, settings: Settings) -> Stored:
    """The stored state now."""
    with Session(engine) as session:
        rows = {
            table.name: int(session.scalar(select(func.count()).select_from(table)) or 0)
            for table in Base.metadata.sorted_tables
        }
        recorded = {row.id: (row.sha256, row.bytes) for row in session.scalars(select(File))}
    return Stored(rows=rows, disk=_disk(settings.data_dir), recorded=recorded)


@pytest.fixture
def snapshot(db_engine: Engine, settings: Settings) -> Callable[[], Stored]:
    """Take a snapshot of the stored state."""
    return lambda: snapshot_of(db_engine, settings)


def assert_refused(response: object, status: int, param: str | None = None) -> dict[str, object]:
    """A 4xx in OpenAI's error envelope (with `param` when given); the error object."""
    assert response.status_code == status, (response.status_code, response.text[:500])  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    error: dict[str, object] = body["error"]
    return error


@pytest.fixture
def healthy(client: TestClient, key_a: str) -> Callable[[], None]:
    """Assert the service still answers: /healthz, and a normal authenticated request as project A."""

    def check() -> None:
        assert client.get("/healthz").json() == {"status": "ok"}
        response = client.get("/v1/files", headers=bearer(key_a))
        assert response.status_code == 200 and response.json()["object"] == "list", response.text

    return check


@pytest.fixture
def unchanged(snapshot: Callable[[], Stored], healthy: Callable[[], None]) -> Callable[[Stored], None]:
    """Assert nothing stored changed since `before`, and the service is healthy."""

    def check(before: Stored) -> None:
        after = snapshot()
        assert after.rows == before.rows
        assert after.disk == before.disk
        assert after.recorded == before.recorded
        healthy()

    return check


@dataclass(frozen=True)
class Owned:
    """Objects of one project: a dataset, a job with an event, a checkpoint, a telemetry sample, an evaluation and
    an export, and the job's fine-tuned model name."""

    file_id: str
    job_id: str
    model_id: str
    evaluation_id: str
    export_id: str


def seed_objects(client: TestClient, key: str, session: Session, *, status: str = "queued") -> Owned:
    """Upload a dataset and create a job as `key`'s project, then write what a worker would (event, checkpoint,
    telemetry, a fine-tuned model name) and set the job's status."""
    from backend.db.models import Checkpoint, Evaluation, Export, Job, JobEvent, TelemetrySample

    response = client.post("/v1/files", headers=bearer(key), files={"file": ("t.jsonl", GOOD_CHAT)},
                           data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    response = client.post("/v1/fine_tuning/jobs", headers=bearer(key),
                           json={"model": "tiny-gpt2", "training_file": file_id})
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    job = session.scalars(select(Job).where(Job.id == job_id)).one()
    model_id = f"ft:tiny-gpt2:seeded:{job_id}"
    job.status, job.fine_tuned_model = status, model_id
    session.add(JobEvent(job_id=job_id, attempt=1, type="metrics", message="step 1",
                         data={"step": 1, "train_loss": 1.5, "learning_rate": 1e-4}))
    session.add(Checkpoint(job_id=job_id, attempt=1, step_number=1, path=f"jobs/{job_id}/checkpoint-1",
                           metrics={"train_loss": 1.5}))
    session.add(TelemetrySample(job_id=job_id, attempt=1, step=1, sample={"rss_bytes": 1}))
    evaluation = Evaluation(job_id=job_id, project_id=job.project_id, file_id=file_id, options={}, status="queued")
    session.add(evaluation)
    export = Export(job_id=job_id, project_id=job.project_id, format="merged", status="queued")
    session.add(export)
    session.commit()
    return Owned(file_id=file_id, job_id=job_id, model_id=model_id, evaluation_id=evaluation.id,
                 export_id=export.id)


@pytest.fixture
def live_url(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn on a free local port (requests in flight at once, as real clients send them)."""
    with served(app) as url:
        yield url
