"""Faults provoked for real on a live deployment: each job ends right, the database agrees, nothing runs twice.

Every test here runs on `fault_stack` (tests/reliability/conftest.py): real uvicorn, a real Celery worker on
the real Redis, PostgreSQL through a proxy the test can cut, trainers in child processes. The process table
is sampled all along: no job ever has two trainer processes alive at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import func, select

from backend.db.fence import StaleAttemptError
from backend.db.models import Artifact, File, Job, JobEvent
from backend.db.session import session_scope
from backend.services import job_runs
from backend.training.checkpoints import COMPLETE_MARKER, TEMP_PREFIX, complete_checkpoints
from tests.reliability.conftest import (
    HEARTBEAT_EXPIRY_SECONDS,
    FaultStack,
    assert_attempts_never_overlap,
    checkpoints,
    events,
    load_job,
    metric_steps,
    redis_down_then_up,
    trainer_starts,
    wait_finished,
)
from tests.support.waiting import wait_for


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _lost_attempts(job_id: str) -> int:
    with session_scope() as session:
        return job_runs.lost_attempts(session=session, job_id=job_id)


def _assert_clean_success(stack: FaultStack, job_id: str, *, attempt: int, steps: int) -> Job:
    """Succeeded on `attempt` with an adapter on disk matching its row; one trainer at a time; no overlap."""
    job = load_job(job_id)
    assert job.status == "succeeded" and job.attempt == attempt and job.error is None, (job.status, job.error)
    assert job.progress_step == steps and job.finished_at is not None and job.requested_action is None
    (file_id,) = job.result_files
    with session_scope() as session:
        result = session.scalar(select(File).where(File.id == file_id))
        artifacts = list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        assert result is not None and len(artifacts) == 1 and artifacts[0].file_id == file_id
        path = stack.data_dir / result.path
    from backend.services.storage import hash_file

    assert hash_file(path) == (result.sha256, result.bytes)
    assert_attempts_never_overlap(job_id)
    assert stack.trainers_seen.get(job_id, 0) <= 1, stack.trainers_seen
    starts = trainer_starts(job_id)
    assert len({attempt for attempt, _ in starts}) == len(starts)  # one trainer per attempt at most
    return job


def _plant_partial_checkpoints(work_dir: Path, last_complete: int) -> list[Path]:
    """What a kill during a save leaves: a temporary folder, and a final-named folder without its marker."""
    source = work_dir / f"checkpoint-{last_complete}"
    temporary = work_dir / f"{TEMP_PREFIX}{last_complete + 1}"
    shutil.copytree(source, temporary)
    (temporary / COMPLETE_MARKER).unlink()
    half = work_dir / f"checkpoint-{last_complete + 2}"
    shutil.copytree(source, half)
    (half / COMPLETE_MARKER).unlink()
    weights = half / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut mid-write
    return [temporary, half]


def test_worker_sigkilled_mid_training_resumes_as_next_attempt(fault_stack: FaultStack) -> None:
    stack = fault_stack
    TOTAL = 200  # noqa: N806 - the tiny model trains ~50 steps a second: the kill must land mid-run
    job_id = stack.submit(max_steps=TOTAL, save_steps=10)
    # Watch the disk, not the table: the trainer can run well ahead of what the worker has recorded.
    wait_for(lambda: len(complete_checkpoints(stack.settings.job_dir(job_id))) >= 2, 120, "two checkpoints",
             interval=0.02, logs=stack.logs)
    tree = stack.worker_tree()
    assert len(tree) >= 3, tree  # worker, its pool process, the trainer
    os.kill(tree[0], signal.SIGKILL)  # the worker's main process only: the kernel takes down the rest
    stack.worker.wait()  # type: ignore[union-attr]
    wait_for(lambda: all(_gone(pid) for pid in tree), 15, "the pool process and the trainer to die with it")
    killed_at = time.monotonic()
    # The last complete checkpoint on disk (the recorder may not have written the newest rows yet: those
    # reports died in the pipe with the worker).
    work_dir = stack.settings.job_dir(job_id)
    saved = int(complete_checkpoints(work_dir)[-1].name.split("-")[-1])
    assert load_job(job_id).status == "running"  # nobody is left to say otherwise: only the heartbeat can
    # Killed while writing a checkpoint: what a save cut short leaves behind must not be resumed from.
    partial = _plant_partial_checkpoints(work_dir, saved)

    stack.start_worker()  # as a supervisor restarts it; its reconciler finds the silent attempt
    wait_for(lambda: load_job(job_id).attempt == 2, 60, "the reconciler to requeue the job as attempt 2",
             logs=stack.logs)
    assert time.monotonic() - killed_at >= HEARTBEAT_EXPIRY_SECONDS - 1  # not before the heartbeat expired
    with session_scope() as session:  # the dead attempt's writes are refused from now on
        for write in (job_runs.heartbeat, job_runs.append_event):
            kwargs = {"message": "late"} if write is job_runs.append_event else {}
            with pytest.raises(StaleAttemptError):
                write(session=session, job_id=job_id, attempt=1, **kwargs)  # type: ignore[operator]

    wait_finished(stack, job_id)
    _assert_clean_success(stack, job_id, attempt=2, steps=TOTAL)
    resumed = metric_steps(job_id, attempt=2)
    assert resumed[0] == saved + 1 > 1, (saved, resumed[:3])
    assert resumed == list(range(saved + 1, TOTAL + 1))
    resumed_from = [event.message for event in events(job_id) if event.attempt == 2 and "Resumed from" in event.message]
    assert len(resumed_from) == 1 and resumed_from[0].endswith(f"checkpoint-{saved} at step {saved}"), resumed_from
    assert not (partial[1] / COMPLETE_MARKER).exists()  # the half-written one was never taken for complete
    assert _lost_attempts(job_id) == 1
    lost = [event for event in events(job_id) if event.message.startswith(job_runs.LOST_ATTEMPT_PREFIX)]
    assert [event.attempt for event in lost] == [1] and "no heartbeat" in lost[0].message
    with session_scope() as session:
        assert not session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.message == "late"))


def test_redis_restarted_with_jobs_queued_and_running(fault_stack: FaultStack) -> None:
    stack = fault_stack
    # The tiny model trains ~50 steps a second: the first job must be long enough to be still running, with
    # the second still waiting for the one worker slot, when Redis goes down.
    steps = [300, 12, 4]
    jobs = [stack.submit(max_steps=steps[0], save_steps=50), stack.submit(max_steps=steps[1], save_steps=4)]
    wait_for(lambda: metric_steps(jobs[0]), 60, "the first job to train", interval=0.02, logs=stack.logs)
    assert (load_job(jobs[0]).status, load_job(jobs[1]).status) == ("running", "queued")

    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=10)
    try:
        with stack.http() as client:  # the API takes a job while the broker is down: committed, 200, not lost
            started = time.monotonic()
            answer = client.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-gpt2", "training_file": stack.file_id,
                "training": {"use_lora": True, "lora_r": 4, "max_steps": steps[2], "logging_steps": 1,
                             "save_steps": 1000, "max_seq_length": 64}})
            create_seconds = time.monotonic() - started
    finally:
        downtime = redis_down_then_up(0.5)
    assert answer.status_code == 200, answer.text
    jobs.append(answer.json()["id"])

    for job_id in jobs:
        wait_finished(stack, job_id, timeout=150)
    for job_id, total in zip(jobs, steps, strict=True):
        _assert_clean_success(stack, job_id, attempt=1, steps=total)
        assert len(trainer_starts(job_id)) == 1
        assert metric_steps(job_id) == list(range(1, total + 1))
    print(f"Redis down {downtime:.1f} s; job create while down answered in {create_seconds:.2f} s")


def _sse_events(response: httpx.Response, until: int | None = None) -> list[tuple[int, dict[str, object]]]:
    """(id, event) from an SSE stream until `event: done` (or `until` events)."""
    got: list[tuple[int, dict[str, object]]] = []
    current: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if current.get("event") == "done":
                return got
            if "id" in current and "data" in current:
                got.append((int(current["id"]), json.loads(current["data"])))
                if until is not None and len(got) >= until:
                    return got
            current = {}
        elif not line.startswith(":") and ":" in line:
            key, _, value = line.partition(":")
            current[key] = value[1:] if value.startswith(" ") else value
    return got


def test_api_restarted_mid_job_sse_resumes_with_last_event_id(fault_stack: FaultStack) -> None:
    stack = fault_stack
    job_id = stack.submit(max_steps=60, save_steps=1000)
    path = f"/v1/fine_tuning/jobs/{job_id}/events"
    with stack.http(timeout=60) as client, client.stream("GET", path, params={"stream": "true"}) as response:
        assert response.status_code == 200
        first = _sse_events(response, until=8)
    stack.kill_api()
    killed = time.monotonic()
    stack.start_api()
    restart_seconds = time.monotonic() - killed
    with stack.http(timeout=120) as client, client.stream(
            "GET", path, params={"stream": "true"}, headers={"Last-Event-ID": str(first[-1][0])}) as response:
        rest = _sse_events(response)
    job = wait_finished(stack, job_id)
    assert job.status == "succeeded"
    _assert_clean_success(stack, job_id, attempt=1, steps=60)
    everything = [(event.seq, event.id) for event in events(job_id)]
    streamed = [(seq, str(event["id"])) for seq, event in first + rest]
    assert streamed == everything  # nothing missed, nothing twice, in order
    assert metric_steps(job_id) == list(range(1, 61))
    print(f"API restart took {restart_seconds:.1f} s; SSE got {len(first)} + {len(rest)} events")


def test_cancel_while_validating_queued_and_running(fault_stack: FaultStack) -> None:
    stack = fault_stack
    running = stack.submit(max_steps=100_000)
    wait_for(lambda: metric_steps(running), 60, "the long job to train", logs=stack.logs)
    queued = stack.submit(max_steps=4)
    assert load_job(queued).status == "queued"
    assert stack.action(queued, "cancel")["status"] == "cancelled"
    stack.action(running, "cancel")
    assert wait_finished(stack, running, timeout=30).status == "cancelled"
    ((_, trainer),) = trainer_starts(running)
    wait_for(lambda: _gone(trainer), 15, "the cancelled trainer to exit")

    # A training file big enough that validating it takes a while: cancel lands in validating_files.
    big = [{"prompt": f"Count from {n}:", "completion": " " + " ".join(str(n + k) for k in range(1, 40))}
           for n in range(15_000)]
    validating = stack.submit(file_id=stack.upload(big), max_steps=4)
    wait_for(lambda: load_job(validating).status == "validating_files", 60, "validation to start", interval=0.01)
    assert stack.action(validating, "cancel")["status"] in ("validating_files", "cancelled")
    assert wait_finished(stack, validating, timeout=60).status == "cancelled"

    for job_id in (running, queued, validating):
        job = load_job(job_id)
        assert job.status == "cancelled" and job.finished_at is not None and job.result_files == []
        assert_attempts_never_overlap(job_id)
    assert load_job(queued).attempt == 0 and not events_of_attempt(queued)  # never claimed, never started
    assert trainer_starts(validating) == [] and metric_steps(validating) == []
    assert load_job(running).attempt == 1 and len(trainer_starts(running)) == 1
    time.sleep(2)  # a stray message would have been claimed by now
    assert [load_job(job_id).status for job_id in (running, queued, validating)] == ["cancelled"] * 3


def events_of_attempt(job_id: str) -> list[JobEvent]:
    return [event for event in events(job_id) if event.attempt > 0]


def test_pause_and_resume_three_times_in_a_row(fault_stack: FaultStack) -> None:
    stack = fault_stack
    total = 300  # the tiny model trains ~50 steps a second: long enough that each pause lands mid-run
    job_id = stack.submit(max_steps=total, save_steps=1000)
    for round_number in (1, 2, 3):
        wait_for(lambda: metric_steps(job_id, attempt=round_number), 90,  # noqa: B023
                 f"attempt {round_number} to train", logs=stack.logs)
        stack.action(job_id, "pause")
        assert wait_finished(stack, job_id, timeout=60).status == "paused"
        stack.action(job_id, "resume")
    job = wait_finished(stack, job_id, timeout=120)
    _assert_clean_success(stack, job_id, attempt=4, steps=total)
    assert metric_steps(job_id) == list(range(1, total + 1))  # every step once, in order, across 4 attempts
    pauses = [checkpoint.step_number for checkpoint in checkpoints(job_id)][:3]
    for attempt, paused_at in zip((2, 3, 4), pauses, strict=True):
        assert metric_steps(job_id, attempt=attempt)[0] == paused_at + 1
    assert _lost_attempts(job_id) == 0 and job.error is None


def test_database_unreachable_api_503_then_recovers_worker_retries(fault_stack: FaultStack) -> None:
    stack = fault_stack
    job_id = stack.submit(max_steps=50, save_steps=10)
    wait_for(lambda: len(metric_steps(job_id)) >= 3, 60, "the job to train", logs=stack.logs)
    outage = 4.0
    stack.proxy.cut()
    cut_at = time.monotonic()
    try:
        with stack.http(timeout=30) as client:
            answers = [client.get(f"/v1/fine_tuning/jobs/{job_id}"), client.get("/v1/files"), client.get("/readyz")]
        time.sleep(max(0.0, outage - (time.monotonic() - cut_at)))
    finally:
        stack.proxy.restore()
    for answer in answers:
        assert answer.status_code == 503, (answer.request.url, answer.status_code, answer.text)
        error = answer.json()["error"]
        assert error["message"] and {"type", "param", "code"} <= error.keys()
        assert error["code"] in ("database_unavailable", "not_ready"), error
    with stack.http() as client:
        recovered = wait_for(lambda: client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200, 30,
                             "the API to answer again on its own")
    recovery_seconds = time.monotonic() - cut_at
    assert recovered
    job = wait_finished(stack, job_id)
    _assert_clean_success(stack, job_id, attempt=1, steps=50)  # the worker waited: no attempt was lost
    assert metric_steps(job_id) == list(range(1, 51)) and job.error is None
    assert "database write failed" in stack.worker_log()
    print(f"database cut {outage:.0f} s; API answered 503, back to 200 {recovery_seconds:.1f} s after the cut")


def test_artifact_store_full_fails_the_job_cleanly(fault_stack: FaultStack) -> None:
    stack = fault_stack
    store = stack.settings.artifacts_dir
    before = {path: path.read_bytes() for path in store.rglob("*") if path.is_file()}
    assert before, "earlier tests stored adapters here"
    with session_scope() as session:
        jobs_before = {row.id: (row.status, row.attempt, row.result_files) for row in session.scalars(select(Job))}
        files_before = {row.id: (row.sha256, row.bytes) for row in session.scalars(select(File))}
    filler = store / "filler"
    with open(filler, "wb") as handle:  # fill the tmpfs to its last byte
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    try:
        job_id = stack.submit(max_steps=4)
        job = wait_finished(stack, job_id)
        assert job.status == "failed" and job.error is not None, job.status
        assert job.error["code"] == "artifact_store_error", job.error
        assert "No space left on device" in job.error["message"], job.error
        assert job.result_files == [] and job.attempt == 1
        with session_scope() as session:
            assert not session.scalar(select(Artifact.seq).where(Artifact.job_id == job_id))
            assert not session.scalar(select(File.seq).where(File.purpose == "fine-tune-results",
                                                             File.path.contains(job_id)))
    finally:
        filler.unlink()
    after = {path: path.read_bytes() for path in store.rglob("*") if path.is_file()}
    assert after == before  # earlier adapters untouched, no partial archive left behind
    with session_scope() as session:
        assert {row.id: (row.status, row.attempt, row.result_files) for row in session.scalars(
            select(Job).where(Job.id.in_(jobs_before)))} == jobs_before
        assert {row.id: (row.sha256, row.bytes) for row in session.scalars(
            select(File).where(File.id.in_(files_before)))} == files_before
    done = next(job_id for job_id, (status, _, files) in jobs_before.items() if status == "succeeded" and files)
    with stack.http() as client:  # the earlier adapters still download, byte for byte
        content = client.get(f"/v1/files/{jobs_before[done][2][0]}/content")
    assert content.status_code == 200 and content.content in before.values()
    # Room again: the next test's job stores its adapter in this same store.


def _deliveries(log: str) -> int:
    return sum(1 for line in log.splitlines() if "Task safetrain.run_job[" in line and line.endswith("received"))


def test_visibility_timeout_shorter_than_the_job_never_runs_it_twice(fault_stack: FaultStack) -> None:
    """Redis hands the unacknowledged message out again 2 s in, to the worker's second, idle pool process."""
    stack = fault_stack
    stack.stop_worker()
    log_start = len(stack.worker_log())
    stack.start_worker(concurrency=2, visibility_seconds=2)  # last test of the module: this worker stays
    job_id = stack.submit(max_steps=100, logging_steps=10, save_steps=1000)
    wait_for(lambda: _deliveries(stack.worker_log()[log_start:]) >= 2, 60,
             "Redis to deliver the job's message a second time", logs=stack.logs)
    job = wait_finished(stack, job_id, timeout=180)
    log = stack.worker_log()[log_start:]
    assert job.status == "succeeded", (job.error, stack.logs())
    _assert_clean_success(stack, job_id, attempt=1, steps=100)
    assert _deliveries(log) >= 2  # the one message (one job was submitted) was delivered twice
    assert f"job {job_id}: gone, finished or claimed by another worker" in log
    assert len(trainer_starts(job_id)) == 1
