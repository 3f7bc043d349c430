"""Jobs run by a live Celery worker on the real Redis: succeed, cancel, pause and resume, fail early on memory."""

from __future__ import annotations

import io
import time
import zipfile

import psutil
import pytest
from sqlalchemy import select

from backend.db.models import Artifact, Checkpoint, File, Job, JobEvent, Project, TelemetrySample
from backend.db.session import session_scope
from backend.services.jobs import cancel_job, pause_job, resume_job
from tests.workers.conftest import WorkerStack, create_job, job_status, load_job, wait_for

JOB_TIMEOUT = 120.0
both = pytest.mark.parametrize("stack", ["postgresql", "sqlite"], indirect=True)
postgres = pytest.mark.parametrize("stack", ["postgresql"], indirect=True)


def _events(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        session.expunge_all()
        return rows


def _checkpoints(job_id: str) -> list[Checkpoint]:
    with session_scope() as session:
        rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.seq)))
        session.expunge_all()
        return rows


def _trainer_pid(job_id: str, attempt: int) -> int | None:
    for event in _events(job_id):
        if event.attempt == attempt and event.message.startswith("Trainer started") and event.data:
            return int(event.data["pid"])
    return None


def _wait_finished(stack: WorkerStack, job_id: str, timeout: float = JOB_TIMEOUT) -> str:
    done = ("succeeded", "failed", "cancelled", "paused")
    status = str(wait_for(lambda: (now := job_status(job_id)) in done and now, timeout, f"job {job_id}", stack))
    if status == "failed":
        print(f"job {job_id} failed: {load_job(job_id).error}")
        for event in _events(job_id):
            print(f"  [{event.attempt}] {event.level} {event.message[:300]}")
    return status


def _request(job_id: str, action: str, stack: WorkerStack) -> None:
    """Cancel, pause or resume through the api helper's job service, as the API's routes do."""
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        if action == "cancel":
            cancel_job(session=session, job=job)
        elif action == "pause":
            pause_job(session=session, job=job)
        else:
            project = session.get(Project, job.project_id)
            assert project is not None
            resume_job(session=session, settings=stack.settings, project=project, job=job)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@both
def test_job_succeeds_with_adapter_archive(stack: WorkerStack) -> None:
    job = create_job(stack.settings, suffix="demo", save_steps=2)
    assert _wait_finished(stack, job.id) == "succeeded", stack.log_tail()
    done = load_job(job.id)
    assert done.attempt == 1 and done.error is None
    assert done.fine_tuned_model == f"ft:tiny-gpt2:demo:{job.id}"
    assert done.trained_tokens and done.trained_tokens > 0
    assert done.memory_peak_bytes and done.memory_peak_bytes > 0 and done.memory_estimate_bytes
    assert done.memory_device == "cpu" and done.progress_step == 4 and done.progress_total_steps == 4
    assert done.training["use_lora"] is True and done.training["max_steps"] == 4
    assert done.finished_at is not None and done.requested_action is None

    events = _events(job.id)
    metrics = [event for event in events if event.type == "metrics"]
    assert [event.data["step"] for event in metrics if event.data] == [1, 2, 3, 4]
    assert all(event.data and "train_loss" in event.data for event in metrics)
    assert [checkpoint.step_number for checkpoint in _checkpoints(job.id)] == [2, 4]
    with session_scope() as session:
        samples = session.scalar(select(TelemetrySample.seq).where(TelemetrySample.job_id == job.id).limit(1))
        assert samples is not None
        (file_id,) = done.result_files
        result = session.scalar(select(File).where(File.id == file_id))
        artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id))
        assert result is not None and artifact is not None
        assert result.purpose == "fine-tune-results" and result.project_id == done.project_id
        assert artifact.file_id == file_id and artifact.sha256 == result.sha256 and artifact.bytes == result.bytes
        path = stack.settings.data_dir / result.path
    archive = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    names = set(archive.namelist())
    assert {"adapter_config.json", "adapter_model.safetensors", "safetrain.json"} <= names
    assert not any(name.startswith(("checkpoint-", "attempt-")) for name in names)
    assert b'"fine_tuned_model"' in archive.read("safetrain.json")


@postgres
def test_cancel_while_running_stops_the_trainer(stack: WorkerStack) -> None:
    job = create_job(stack.settings, max_steps=2000)
    wait_for(lambda: (load_job(job.id).progress_step or 0) >= 2, JOB_TIMEOUT, "training to start", stack)
    pid = _trainer_pid(job.id, 1)
    assert pid is not None and not _gone(pid)
    _request(job.id, "cancel", stack)
    assert _wait_finished(stack, job.id, timeout=30) == "cancelled"
    assert wait_for(lambda: _gone(pid), 10, "the trainer process to exit")
    done = load_job(job.id)
    assert done.finished_at is not None and done.result_files == [] and (done.progress_step or 0) < 2000


@postgres
def test_pause_then_resume_continues_from_the_checkpoint(stack: WorkerStack) -> None:
    job = create_job(stack.settings, max_steps=60)
    wait_for(lambda: (load_job(job.id).progress_step or 0) >= 3, JOB_TIMEOUT, "a few steps", stack)
    _request(job.id, "pause", stack)
    assert _wait_finished(stack, job.id, timeout=30) == "paused"
    saved = [checkpoint.step_number for checkpoint in _checkpoints(job.id) if checkpoint.attempt == 1]
    assert saved and 3 <= saved[-1] < 60, saved
    pid = _trainer_pid(job.id, 1)
    assert pid is not None and _gone(pid)

    _request(job.id, "resume", stack)
    assert _wait_finished(stack, job.id) == "succeeded", stack.log_tail()
    done = load_job(job.id)
    assert done.attempt == 2 and done.progress_step == 60
    second = [event.data["step"] for event in _events(job.id)
              if event.attempt == 2 and event.type == "metrics" and event.data]
    assert second[0] == saved[-1] + 1, second[:3]  # not step 1: it resumed where the pause checkpointed
    assert any(event.attempt == 2 and event.message.startswith("Resumed from") for event in _events(job.id))


@both
def test_plan_that_cannot_fit_fails_early(stack: WorkerStack) -> None:
    started = time.monotonic()
    job = create_job(stack.settings, model="huge-llama")
    assert _wait_finished(stack, job.id, timeout=60) == "failed"
    elapsed = time.monotonic() - started
    done = load_job(job.id)
    assert done.error is not None and done.error["code"] == "out_of_memory"
    assert "Recommendation" in done.error["message"]
    assert _trainer_pid(job.id, 1) is None  # no trainer was ever started
    assert elapsed < 30


@postgres
def test_submit_to_running_latency(stack: WorkerStack) -> None:
    """Committed job (create_job returns after commit and enqueue) → status running, on a warm worker.

    Each job is cancelled as soon as it runs: its trainer is still importing, so this costs little CPU.
    """
    latencies = []
    for _ in range(5):
        started = time.monotonic()
        job_id = create_job(stack.settings).id
        wait_for(lambda: job_status(job_id) == "running", 30, "running", stack, interval=0.002)  # noqa: B023
        latencies.append(time.monotonic() - started)
        _request(job_id, "cancel", stack)
        assert _wait_finished(stack, job_id, timeout=60) == "cancelled"
    latencies.sort()
    print(f"submit -> running on Redis + PostgreSQL, warm worker: {[round(value * 1000) for value in latencies]} ms")
    assert latencies[len(latencies) // 2] < 1.0
