"""Jobs run by a live Celery worker on the real Redis: succeed, cancel, pause and resume, fail early on memory."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile

import psutil
import pytest
from sqlalchemy import select

from backend.db.models import Artifact, Checkpoint, File, Job, Project, TelemetrySample
from backend.db.session import session_scope
from backend.services import job_runs
from backend.services.jobs import cancel_job, pause_job, resume_job
from backend.workers.dispatch import enqueue_job
from tests.support.waiting import wait_for
from tests.workers.conftest import WorkerStack, create_job, job_events, job_status, load_job

JOB_TIMEOUT = 120.0
both = pytest.mark.parametrize("stack", ["postgresql", "sqlite"], indirect=True)
postgres = pytest.mark.parametrize("stack", ["postgresql"], indirect=True)


def _checkpoints(job_id: str) -> list[Checkpoint]:
    with session_scope() as session:
        rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.seq)))
        session.expunge_all()
        return rows


def _trainer_pid(job_id: str, attempt: int) -> int | None:
    for event in job_events(job_id):
        if event.attempt == attempt and event.message.startswith("Trainer started") and event.data:
            return int(event.data["pid"])
    return None


def _wait_finished(stack: WorkerStack, job_id: str, timeout: float = JOB_TIMEOUT) -> str:
    done = ("succeeded", "failed", "cancelled", "paused")
    status = str(wait_for(lambda: (now := job_status(job_id)) in done and now, timeout, f"job {job_id}", stack))
    if status == "failed":
        print(f"job {job_id} failed: {load_job(job_id).error}")
        for event in job_events(job_id):
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
            resume_job(session=session, settings=stack.settings, project=project, job=job, enqueue=enqueue_job)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_succeeded_with_adapter(stack: WorkerStack, job_id: str, *, steps: int, attempt: int) -> None:
    """The job row, its events, checkpoints, telemetry and result file say it succeeded with an adapter."""
    done = load_job(job_id)
    assert done.status == "succeeded" and done.attempt == attempt and done.error is None
    assert done.fine_tuned_model == f"ft:tiny-gpt2:{done.suffix or _project_name(done.project_id)}:{job_id}"
    assert done.trained_tokens and done.trained_tokens > 0
    assert done.memory_peak_bytes and done.memory_peak_bytes > 0 and done.memory_estimate_bytes
    assert done.memory_device == "cpu" and done.progress_step == steps and done.progress_total_steps == steps
    assert done.training["use_lora"] is True and done.training["max_steps"] == steps
    assert done.finished_at is not None and done.requested_action is None
    metrics = [event for event in job_events(job_id) if event.type == "metrics"]
    assert metrics and all(event.data and "train_loss" in event.data for event in metrics)
    assert _checkpoints(job_id)[-1].step_number == steps
    with session_scope() as session:
        assert session.scalar(select(TelemetrySample.seq).where(TelemetrySample.job_id == job_id).limit(1))
        (file_id,) = done.result_files
        result = session.scalar(select(File).where(File.id == file_id))
        artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id))
        assert result is not None and artifact is not None
        assert result.purpose == "fine-tune-results" and result.project_id == done.project_id
        assert artifact.file_id == file_id and artifact.sha256 == result.sha256 and artifact.bytes == result.bytes
        path = stack.settings.data_dir / result.path
    archive = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    names = set(archive.namelist())
    assert {"adapter_config.json", "adapter_model.safetensors", "safetrain.json"} <= names
    assert not any(name.startswith(("checkpoint-", "worker")) or name == "telemetry.jsonl" for name in names)
    manifest = json.loads(archive.read("safetrain.json"))
    assert manifest["fine_tuned_model"] == done.fine_tuned_model and manifest["base_weight_sha256"]


def _project_name(project_id: str) -> str:
    with session_scope() as session:
        project = session.get(Project, project_id)
        assert project is not None
        return project.name


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_job_succeeds_with_adapter_archive(stack: WorkerStack) -> None:
    job = create_job(stack.settings, suffix="demo", save_steps=2)
    assert _wait_finished(stack, job.id) == "succeeded", stack.log_tail()
    assert_succeeded_with_adapter(stack, job.id, steps=4, attempt=1)
    metrics = [event for event in job_events(job.id) if event.type == "metrics" and event.data]
    assert [event.data["step"] for event in metrics] == [1, 2, 3, 4]
    assert [checkpoint.step_number for checkpoint in _checkpoints(job.id)] == [2, 4]
    assert load_job(job.id).fine_tuned_model == f"ft:tiny-gpt2:demo:{job.id}"


def _metric_steps(job_id: str, attempt: int) -> list[int]:
    return [int(event.data["step"]) for event in job_events(job_id)
            if event.attempt == attempt and event.type == "metrics" and event.data]


@postgres
def test_pause_resume_handback_then_cancel(stack: WorkerStack) -> None:
    """Pause, resume from the pause's checkpoint, a worker restart resumes again, cancel stops the trainer."""
    job = create_job(stack.settings, max_steps=2000)
    wait_for(lambda: (load_job(job.id).progress_step or 0) >= 3, JOB_TIMEOUT, "a few steps", stack)
    _request(job.id, "pause", stack)
    assert _wait_finished(stack, job.id, timeout=30) == "paused"
    saved = [checkpoint.step_number for checkpoint in _checkpoints(job.id) if checkpoint.attempt == 1]
    assert len(saved) == 1 and saved[0] >= 3, saved  # the pause wrote exactly one checkpoint, where it stopped
    first_trainer = _trainer_pid(job.id, 1)
    assert first_trainer is not None and _gone(first_trainer)
    assert load_job(job.id).finished_at is None  # paused is not finished

    _request(job.id, "resume", stack)
    wait_for(lambda: len(_metric_steps(job.id, 2)) >= 2, JOB_TIMEOUT, "the resumed attempt to train", stack)
    assert _metric_steps(job.id, 2)[0] == saved[0] + 1  # not step 1: it continued from the pause's checkpoint
    assert any(event.attempt == 2 and event.message.startswith("Resumed from") for event in job_events(job.id))
    second_trainer = _trainer_pid(job.id, 2)
    assert second_trainer is not None and not _gone(second_trainer)

    # The worker is stopped (SIGTERM, as by `docker stop`): its trainer checkpoints, the job goes back to
    # the queue, and the next worker continues from that checkpoint without counting a lost attempt.
    stack.restart_worker()
    assert _gone(second_trainer)
    handed_back = max(checkpoint.step_number for checkpoint in _checkpoints(job.id) if checkpoint.attempt == 2)
    wait_for(lambda: len(_metric_steps(job.id, 3)) >= 2, JOB_TIMEOUT, "the next worker to train", stack)
    assert _metric_steps(job.id, 3)[0] == handed_back + 1
    with session_scope() as session:
        assert job_runs.lost_attempts(session=session, job_id=job.id) == 0
    trainer = _trainer_pid(job.id, 3)
    assert trainer is not None and not _gone(trainer)

    _request(job.id, "cancel", stack)
    assert _wait_finished(stack, job.id, timeout=30) == "cancelled"
    assert wait_for(lambda: _gone(trainer), 10, "the trainer process to exit")
    done = load_job(job.id)
    assert done.attempt == 3 and done.finished_at is not None and done.result_files == []
    assert (done.progress_step or 0) < 2000


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
    for _ in range(3):
        started = time.monotonic()
        job_id = create_job(stack.settings).id
        wait_for(lambda: job_status(job_id) == "running", 30, "running", stack, interval=0.002)  # noqa: B023
        latencies.append(time.monotonic() - started)
        _request(job_id, "cancel", stack)
        assert _wait_finished(stack, job_id, timeout=60) == "cancelled"
    latencies.sort()
    print(f"submit -> running on Redis + PostgreSQL, warm worker: {[round(value * 1000) for value in latencies]} ms")
    assert latencies[len(latencies) // 2] < 1.0


@postgres
def test_trainer_that_dies_every_time_fails_at_the_retry_cap(stack: WorkerStack) -> None:
    """A trainer killed on every attempt (as by the kernel's OOM killer) is retried, then failed with the reason."""
    job = create_job(stack.settings)
    for attempt in (1, 2, 3):
        pid = wait_for(lambda: _trainer_pid(job.id, attempt), 60, f"trainer of attempt {attempt}", stack)  # noqa: B023
        os.kill(pid, signal.SIGKILL)
    assert _wait_finished(stack, job.id, timeout=60) == "failed"
    done = load_job(job.id)
    assert done.attempt == 3 and done.error is not None and done.error["code"] == "trainer_crashed"
    assert "after 3 lost attempts" in done.error["message"] and "SIGKILL" in done.error["message"]
    events = job_events(job.id)
    assert [event.attempt for event in events if event.message.startswith("Attempt lost: ")] == [1, 2, 3]
    assert [event.attempt for event in events if event.message.startswith("Retrying")] == [1, 2]
    time.sleep(2 * stack.settings.heartbeat_seconds)
    assert load_job(job.id).attempt == 3  # no loop: nothing claims it again
