"""The attempt fence of backend/services/job_runs.py, on SQLite and PostgreSQL (the root conftest's db_engine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select

from backend.db.fence import StaleAttemptError
from backend.db.models import Checkpoint, File, Job, JobEvent, Project, TelemetrySample, now
from backend.db.session import session_scope, set_engine
from backend.services import job_runs


@pytest.fixture
def fenced_db(db_engine: Engine) -> Iterator[Engine]:
    """This process's sessions on the test database (back to the settings' engine afterwards)."""
    set_engine(db_engine)
    yield db_engine
    set_engine(None)


def _queued_job(**values: object) -> str:
    with session_scope() as session:
        project = Project(name=f"fence-{now()}-{id(values)}")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="tiny-gpt2", training_file_id="file-x", status="queued",
                  hyperparameters={}, training={}, result_files=[], **values)
        session.add(job)
        session.flush()
        return job.id


def _claim(job_id: str, worker: str = "w1") -> job_runs.ClaimedJob | None:
    with session_scope() as session:
        return job_runs.claim_job(session=session, job_id=job_id, worker=worker)


def _count(model: type, job_id: str, attempt: int) -> int:
    with session_scope() as session:
        query = select(func.count()).select_from(model).where(model.job_id == job_id, model.attempt == attempt)
        return int(session.scalar(query) or 0)


def test_claim_raises_attempt_once(fenced_db: Engine) -> None:
    job_id = _queued_job()
    first = _claim(job_id, "w1")
    assert first is not None and first.attempt == 1
    assert _claim(job_id, "w2") is None  # a redelivered message finds the job taken
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        assert (job.status, job.attempt, job.worker) == ("validating_files", 1, "w1")
        assert job.started_at is not None and job.heartbeat_at is not None


def test_stale_attempt_writes_are_refused(fenced_db: Engine) -> None:
    job_id = _queued_job()
    stale = _claim(job_id)
    assert stale is not None
    with session_scope() as session:
        job_runs.append_event(session=session, job_id=job_id, attempt=1, message="from attempt 1")
    # The reconciler decides attempt 1 is dead (its heartbeat is older than the cutoff) and requeues it.
    with session_scope() as session:
        assert job_runs.expire_attempt(session=session, job_id=job_id, attempt=1, expiry_seconds=-1,
                                         status="queued")
    live = _claim(job_id, "w2")
    assert live is not None and live.attempt == 2

    writes = {
        "heartbeat": lambda s: job_runs.heartbeat(session=s, job_id=job_id, attempt=1),
        "event": lambda s: job_runs.append_event(session=s, job_id=job_id, attempt=1, message="late"),
        "checkpoint": lambda s: job_runs.record_checkpoint(
            session=s, job_id=job_id, attempt=1, step_number=3, path="jobs/x/checkpoint-3", metrics=None),
        "telemetry": lambda s: job_runs.record_telemetry(
            session=s, job_id=job_id, attempt=1, step=3, sample={"used_bytes": 1}, peak_bytes=10**12),
        "progress": lambda s: job_runs.record_progress(
            session=s, job_id=job_id, attempt=1, step=3, total_steps=4, epoch=0.5, peak_bytes=10**12),
        "result": lambda s: job_runs.store_result_file(
            session=s, job_id=job_id, attempt=1, path="artifacts/x.zip", sha256="0" * 64, size=1, filename="x.zip"),
        "finish": lambda s: job_runs.finish(session=s, job_id=job_id, attempt=1, status="succeeded",
                                            fine_tuned_model="ft:stale", result_files=["file-stale"]),
    }
    for name, write in writes.items():
        with pytest.raises(StaleAttemptError), session_scope() as session:
            write(session)
        assert name  # every write of the stale attempt raised

    # Nothing of the stale writes is stored; the job still belongs to attempt 2, untouched.
    assert _count(JobEvent, job_id, 1) == 1
    assert _count(Checkpoint, job_id, 1) == 0 and _count(TelemetrySample, job_id, 1) == 0
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        assert (job.status, job.attempt, job.worker) == ("validating_files", 2, "w2")
        assert job.fine_tuned_model is None and job.result_files == [] and job.memory_peak_bytes is None
        assert session.scalar(select(func.count()).select_from(File).where(File.path == "artifacts/x.zip")) == 0
    # The live attempt writes as usual.
    with session_scope() as session:
        assert job_runs.append_event(session=session, job_id=job_id, attempt=2, message="live") is None
    with session_scope() as session:
        job_runs.finish(session=session, job_id=job_id, attempt=2, status="cancelled")
    with pytest.raises(StaleAttemptError), session_scope() as session:  # finished: even attempt 2 is done
        job_runs.heartbeat(session=session, job_id=job_id, attempt=2)


def test_heartbeat_reports_requested_action(fenced_db: Engine) -> None:
    job_id = _queued_job()
    assert _claim(job_id) is not None
    with session_scope() as session:
        assert job_runs.heartbeat(session=session, job_id=job_id, attempt=1) is None
        session.execute(Job.__table__.update().where(Job.id == job_id).values(requested_action="pause"))
    with session_scope() as session:
        assert job_runs.heartbeat(session=session, job_id=job_id, attempt=1) == "pause"


def test_peak_memory_only_rises(fenced_db: Engine) -> None:
    job_id = _queued_job()
    assert _claim(job_id) is not None
    for peak in (500, 2000, 1000):
        with session_scope() as session:
            job_runs.record_progress(session=session, job_id=job_id, attempt=1, step=1, total_steps=4, epoch=0.1,
                                     peak_bytes=peak)
    with session_scope() as session:
        assert session.scalar(select(Job.memory_peak_bytes).where(Job.id == job_id)) == 2000


def test_expire_spares_a_live_heartbeat(fenced_db: Engine) -> None:
    job_id = _queued_job()
    assert _claim(job_id) is not None
    with session_scope() as session:
        # The heartbeat just written is younger than the expiry, so the attempt is alive.
        assert not job_runs.expire_attempt(session=session, job_id=job_id, attempt=1, expiry_seconds=60,
                                           status="queued")
    with session_scope() as session:
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == "validating_files"
