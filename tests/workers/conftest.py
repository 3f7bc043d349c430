"""Live workers for the worker tests: a real `celery worker` process on the real Redis, real databases.

`stack` (indirect-parametrized by "postgresql" or "sqlite", one per session each) is a migrated database
(a fresh PostgreSQL schema in db `test`, or a SQLite file), a data folder, a models folder with the tiny
model, Redis db 14 flushed for this run, and a Celery worker subprocess (`celery -A
backend.workers.celery_app worker`) with short heartbeats. This process's settings and engine point at
the same database and broker, so the api helper's services create and enqueue jobs exactly as the API does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
import redis
from sqlalchemy import Engine, select, text

from backend.config import Settings, get_settings
from backend.db.migrations import upgrade_to_head
from backend.db.models import File, Job, JobEvent, Project
from backend.db.session import make_engine, session_scope, set_engine
from backend.services.storage import hash_file
from tests.support.data import TRAIN_LINES
from tests.support.databases import POSTGRES_URL
from tests.support.models import HUGE_LLAMA

RowT = TypeVar("RowT")
WORKER_REDIS_URL = os.environ.get("SAFETRAIN_TEST_WORKER_REDIS", "redis://127.0.0.1:6379/14")
HEARTBEAT_SECONDS = 1
HEARTBEAT_EXPIRY_SECONDS = 6


@dataclass
class WorkerStack:
    """A live worker and everything a test needs to give it jobs."""

    backend: str
    settings: Settings
    engine: Engine
    env: dict[str, str]
    worker: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def restart_worker(self) -> None:
        """Stop the worker as an operator would (SIGTERM: warm shutdown), then start a fresh one."""
        _stop(self.worker)
        self.worker = _start_worker(self.backend, self.env, self.log_path)


def _fresh_schema_url() -> tuple[str, Callable[[], None]]:
    schema = f"workers_test_{uuid.uuid4().hex[:10]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return f"{POSTGRES_URL}?options={quote(f'-csearch_path={schema}')}", drop


@pytest.fixture(scope="package")
def worker_tmp() -> Iterator[Path]:
    """This session's own temporary folder: pytest's numbered ones may be pruned by another pytest run
    of the same user on this shared machine while a live worker still uses them."""
    root = Path(tempfile.mkdtemp(prefix="safetrain-worker-tests-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="package")
def worker_models_dir(worker_tmp: Path) -> Path:
    """tiny-gpt2 (a real random-weight model) and huge-llama (a config no plan can fit)."""
    from backend.training.tiny_models import make_tiny_model

    root = worker_tmp / "models"
    make_tiny_model(root / "tiny-gpt2", hidden=32, layers=1, heads=2, context=128)
    huge = root / "huge-llama"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps(HUGE_LLAMA))
    (huge / "model.safetensors").write_bytes(b"")
    return root


@pytest.fixture(scope="package")
def stack(request: pytest.FixtureRequest, worker_tmp: Path, worker_models_dir: Path) -> Iterator[WorkerStack]:
    """A live worker on request.param's database ("postgresql" or "sqlite") and Redis db 14."""
    backend = request.param
    # A folder of its own each time: the suites under tests/workers may set this stack up more than once.
    data_dir = Path(tempfile.mkdtemp(prefix=f"data-{backend}-", dir=worker_tmp))
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if backend == "postgresql":
        database_url, cleanup = _fresh_schema_url()
    else:
        database_url = f"sqlite:///{data_dir / 'safetrain.db'}"
    broker = redis.Redis.from_url(WORKER_REDIS_URL)
    broker.flushdb()
    env = {
        **os.environ,
        "SAFETRAIN_DATA_DIR": str(data_dir),
        "SAFETRAIN_MODELS_DIR": str(worker_models_dir),
        "SAFETRAIN_DATABASE_URL": database_url,
        "SAFETRAIN_BROKER_URL": WORKER_REDIS_URL,
        "SAFETRAIN_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "SAFETRAIN_HEARTBEAT_EXPIRY_SECONDS": str(HEARTBEAT_EXPIRY_SECONDS),
        "SAFETRAIN_VISIBILITY_TIMEOUT_SECONDS": "120",
        "SAFETRAIN_MAX_ATTEMPTS": "3",
    }
    previous = {key: os.environ.get(key) for key in env if key.startswith("SAFETRAIN_")}
    os.environ.update({key: value for key, value in env.items() if key.startswith("SAFETRAIN_")})
    get_settings.cache_clear()
    settings = get_settings()
    engine = make_engine(database_url)
    upgrade_to_head(engine)
    set_engine(engine)
    log_path = data_dir / "worker.log"
    live = WorkerStack(backend, settings, engine, env, _start_worker(backend, env, log_path), log_path)
    try:
        yield live
    finally:
        _stop(live.worker)
        set_engine(None)
        engine.dispose()
        cleanup()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
        broker.flushdb()


def _start_worker(backend: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`celery -A backend.workers.celery_app worker`, one pool process, logging to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "backend.workers.celery_app", "worker", "--loglevel=INFO",
             "--concurrency=1", "--pool=prefork", "--queues=safetrain", "--without-mingle", "--without-gossip",
             f"--hostname=test-{backend}@%h"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, then kill what is left of the worker's process group."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def load_row(model: type[RowT], row_id: str) -> RowT:
    """One row by id, detached from its session."""
    with session_scope() as session:
        row = session.scalar(select(model).where(model.id == row_id))  # type: ignore[attr-defined]
        assert row is not None, f"no {model.__name__} {row_id}"
        session.expunge(row)
        return row


def load_job(job_id: str) -> Job:
    return load_row(Job, job_id)


def job_status(job_id: str) -> str:
    return load_job(job_id).status


def make_project_and_file(settings: Settings, lines: list[dict[str, Any]] | None = None) -> tuple[Project, File]:
    """A project and a processed fine-tune file stored under data_dir, as an upload leaves them."""
    name = f"proj-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        project = Project(name=name)
        session.add(project)
        session.flush()
        file_row = File(project_id=project.id, filename="train.jsonl", purpose="fine-tune", bytes=0, sha256="",
                        path="", status="processed", format="prompt_completion")
        session.add(file_row)
        session.flush()
        relative = Path("files") / f"{file_row.id}.jsonl"
        target = settings.data_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(line) + "\n" for line in (lines or TRAIN_LINES)))
        file_row.sha256, file_row.bytes = hash_file(target)
        file_row.path = str(relative)
        file_row.n_examples = len(lines or TRAIN_LINES)
        session.flush()
        session.expunge_all()
    return project, file_row


def create_job(settings: Settings, *, model: str = "tiny-gpt2", suffix: str | None = None,
               **training: Any) -> Job:
    """Create (commit, then enqueue) a job through the api helper's job service, as POST /v1/fine_tuning/jobs."""
    from backend.services.job_request import JobCreateRequest
    from backend.services.jobs import create_job as service_create_job
    from backend.workers.dispatch import enqueue_job

    project, file_row = make_project_and_file(settings)
    fields = {"max_steps": 4, "logging_steps": 1, "max_seq_length": 64, "per_device_train_batch_size": 2,
              **training}
    spec = JobCreateRequest(model=model, training_file=file_row.id, training=fields, suffix=suffix)
    with session_scope() as session:
        project = session.merge(project)
        job = service_create_job(session=session, settings=settings, project=project, spec=spec, enqueue=enqueue_job)
        session.expunge(job)
    return job


RECONCILER_REDIS_URL = "redis://127.0.0.1:6379/10"


@pytest.fixture
def reconciler_env(db_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The test database for this process's sessions and Redis db 10 (no worker listens) as the broker."""
    monkeypatch.setenv("SAFETRAIN_BROKER_URL", RECONCILER_REDIS_URL)
    get_settings.cache_clear()
    set_engine(db_engine)
    broker = redis.Redis.from_url(RECONCILER_REDIS_URL)
    broker.flushdb()
    yield Settings(data_dir=tmp_path, broker_url=RECONCILER_REDIS_URL, heartbeat_seconds=1,
                   heartbeat_expiry_seconds=6, visibility_timeout_seconds=60, max_attempts=3)
    broker.flushdb()
    set_engine(None)
    get_settings.cache_clear()


def job_events(job_id: str) -> list[JobEvent]:
    """The job's events, oldest first, detached."""
    with session_scope() as session:
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        session.expunge_all()
        return rows
