"""The reconciler: dead attempts requeued (and resumed) or failed at the cap, lost messages sent again."""

from __future__ import annotations

import base64
import json
import os
import signal

import psutil
import pytest
import redis
from sqlalchemy import select

from backend.config import Settings
from backend.db.models import Job, JobEvent, Project, now
from backend.db.session import session_scope
from backend.services import job_runs
from backend.training.checkpoints import checkpoint_step, latest_complete_checkpoint
from backend.workers.celery_app import QUEUE
from backend.workers.reconciler import reconcile_once
from tests.support.waiting import wait_for
from tests.workers.conftest import RECONCILER_REDIS_URL, WorkerStack, create_job, job_events
from tests.workers.jobs.test_task import (
    _checkpoints,
    _gone,
    _trainer_pid,
    _wait_finished,
    assert_succeeded_with_adapter,
)


def _job(**values: object) -> str:
    with session_scope() as session:
        project = Project(name=f"reconcile-{now()}-{id(values)}")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="tiny-gpt2", training_file_id="file-x", hyperparameters={},
                  training={}, result_files=[], **values)
        session.add(job)
        session.flush()
        return job.id


def _queued_messages() -> list[str]:
    """The job ids of the task messages waiting in Redis db 10."""
    broker = redis.Redis.from_url(RECONCILER_REDIS_URL)
    bodies = [json.loads(raw) for raw in broker.lrange(QUEUE, 0, -1)]
    # A Celery message body is base64 JSON [args, kwargs, embed]; args is [job_id] and nothing more.
    args = [json.loads(base64.b64decode(message["body"]))[0] for message in bodies]
    assert all(len(arg) == 1 for arg in args)
    return [arg[0] for arg in args]


def _lost_before(job_id: str, attempts: list[int]) -> None:
    with session_scope() as session:
        for attempt in attempts:
            job_runs.record_lost_attempt(session=session, job_id=job_id, attempt=attempt, reason="test")


def test_dead_attempts_requeued_or_failed_at_the_cap(reconciler_env: Settings) -> None:
    old = now() - 100
    dead = _job(status="running", attempt=1, heartbeat_at=old, worker="gone:1")
    last_try = _job(status="running", attempt=3, heartbeat_at=old, worker="gone:2")
    _lost_before(last_try, [1, 2])
    resumed_often = _job(status="running", attempt=5, heartbeat_at=old)  # paused and resumed: nothing lost
    cancelling = _job(status="running", attempt=1, heartbeat_at=old, requested_action="cancel")
    alive = _job(status="running", attempt=1, heartbeat_at=now(), worker="here:1")

    report = reconcile_once(reconciler_env)

    assert sorted(report.requeued) == sorted([dead, resumed_often])
    assert report.failed == [last_try] and report.stopped == [cancelling]
    with session_scope() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
    assert (jobs[dead].status, jobs[dead].attempt, jobs[dead].worker) == ("queued", 1, None)
    assert jobs[last_try].status == "failed" and jobs[last_try].error is not None
    assert jobs[last_try].error["code"] == "worker_lost"
    assert "after 3 lost attempts" in jobs[last_try].error["message"]
    assert jobs[resumed_often].status == "queued"
    assert jobs[cancelling].status == "cancelled" and jobs[cancelling].finished_at is not None
    assert jobs[alive].status == "running"
    with session_scope() as session:
        assert job_runs.lost_attempts(session=session, job_id=dead) == 1
        assert job_runs.lost_attempts(session=session, job_id=cancelling) == 0
    # The requeued jobs' messages are on the broker, and nothing else.
    assert sorted(_queued_messages()) == sorted([dead, resumed_often])
    assert reconcile_once(reconciler_env).requeued == []  # a second pass finds nothing to do


def test_lost_message_is_sent_again_once(reconciler_env: Settings) -> None:
    lost = _job(status="queued", created_at=now() - 100)
    fresh = _job(status="queued")

    report = reconcile_once(reconciler_env)

    assert report.resent == [lost] and _queued_messages() == [lost]
    assert fresh not in report.resent  # younger than the expiry: its message is presumably on its way
    # The next passes see one message waiting per... at most the queued jobs, and the doorbell just rang.
    assert reconcile_once(reconciler_env).resent == []
    assert _queued_messages() == [lost]


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_killed_worker_process_is_requeued_and_resumes(stack: WorkerStack) -> None:
    """SIGKILL the pool process running a job: its trainer dies with it, the heartbeat expires, the
    reconciler requeues the job as attempt 2, which resumes from the last complete checkpoint."""
    job = create_job(stack.settings, max_steps=40, save_steps=2)
    wait_for(lambda: len(_checkpoints(job.id)) >= 2, 120, "two checkpoints", stack)
    trainer = _trainer_pid(job.id, 1)
    assert trainer is not None
    pool_process = psutil.Process(trainer).ppid()
    assert pool_process != stack.worker.pid  # the trainer is a child of the pool process, not of the worker
    os.kill(pool_process, signal.SIGKILL)
    assert wait_for(lambda: _gone(trainer), 10, "the orphaned trainer to die with its parent")
    # The last checkpoint on disk may be newer than the last one in SQL (the kill can land between the two).
    latest = latest_complete_checkpoint(stack.settings.job_dir(job.id))
    assert latest is not None
    saved_before = checkpoint_step(latest)
    assert saved_before is not None

    assert _wait_finished(stack, job.id, timeout=180) == "succeeded", stack.log_tail()
    assert_succeeded_with_adapter(stack, job.id, steps=40, attempt=2)
    second = [event.data["step"] for event in job_events(job.id)
              if event.attempt == 2 and event.type == "metrics" and event.data]
    assert second and second[0] == saved_before + 1, (saved_before, second[:3])
    assert saved_before in {checkpoint.step_number for checkpoint in _checkpoints(job.id)}  # adopted if unrecorded
    with session_scope() as session:
        attempts = set(session.scalars(select(JobEvent.attempt).where(JobEvent.job_id == job.id)))
    assert attempts >= {1, 2}
