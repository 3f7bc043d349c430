"""The reconciler's evaluation pass: dead attempts requeued (and sent) or failed at the cap, lost messages sent
again once, finished evaluations and live heartbeats left alone, racing reconcilers changing a row once."""

from __future__ import annotations

import base64
import json
import threading
import uuid

import redis
from sqlalchemy import select, update

from backend.config import Settings
from backend.db.models import Evaluation, Job, Project, now
from backend.db.session import session_scope
from backend.services import evaluation_runs as evaluations
from backend.services.evaluation_runs import RUN_EVALUATION as EVALUATION_TASK_NAME
from backend.workers.celery_app import QUEUE
from backend.workers.dispatch import enqueue_evaluation
from backend.workers.reconciler import ReconcileReport, reconcile_once
from tests.workers.conftest import RECONCILER_REDIS_URL as BROKER_URL
from tests.workers.conftest import job_events, load_row


def _job(status: str = "succeeded", finished_at: int | None = None) -> str:
    """A job in `status`: a succeeded one finished at `finished_at` (100 s ago unless given), a running one alive."""
    with session_scope() as session:
        project = Project(name=f"reconcile-evaluations-{uuid.uuid4().hex}")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="tiny-gpt2", training_file_id="file-x", hyperparameters={},
                  training={}, result_files=[], status=status, attempt=1, heartbeat_at=now(), worker="w:1")
        if status == "succeeded":
            job.finished_at = finished_at if finished_at is not None else now() - 100
            job.worker = None
        session.add(job)
        session.flush()
        return job.id


def _evaluation(job_id: str, **values: object) -> str:
    """An evaluation row as the API writes it (see tests/security/conftest.py seed_objects), with `values`."""
    with session_scope() as session:
        project_id = session.scalar(select(Job.project_id).where(Job.id == job_id))
        row = Evaluation(job_id=job_id, project_id=project_id, file_id="file-evals", options={"mode": "lint"},
                         **{"status": "queued", "created_at": now() - 100, **values})
        session.add(row)
        session.flush()
        return row.id


def _row(evaluation_id: str) -> Evaluation:
    return load_row(Evaluation, evaluation_id)


def _messages() -> list[str]:
    """The evaluation ids of the task messages waiting in Redis db 10 (every one a run_evaluation message)."""
    broker = redis.Redis.from_url(BROKER_URL)
    ids = []
    for raw in broker.lrange(QUEUE, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == EVALUATION_TASK_NAME
        args = json.loads(base64.b64decode(message["body"]))[0]
        assert len(args) == 1
        ids.append(args[0])
    return ids


def test_dead_attempt_requeued_and_sent(reconciler_env: Settings) -> None:
    job_id = _job()
    dead = _evaluation(job_id, status="running", attempt=1, worker="gone:1", heartbeat_at=now() - 100)

    report = reconcile_once(reconciler_env)

    assert report.evaluations_requeued == [dead]
    assert report.evaluations_failed == [] and report.evaluations_resent == []
    assert report.requeued == [] and report.resent == []  # the job pass had nothing to do
    row = _row(dead)
    assert (row.status, row.attempt, row.worker, row.error) == ("queued", 1, None, None)
    assert row.heartbeat_at is not None and row.heartbeat_at >= now() - 2  # when its message was sent again
    assert _messages() == [dead]
    warnings = [event for event in job_events(job_id) if event.level == "warn"]
    assert len(warnings) == 1 and warnings[0].data == {"evaluation_id": dead, "attempt": 1}
    assert "no heartbeat for 6 s" in warnings[0].message and "attempt 1 of 3" in warnings[0].message

    # The next pass sees it queued with its message waiting: nothing more to do.
    assert not reconcile_once(reconciler_env).changed()
    assert _messages() == [dead]
    # A worker claims it as attempt 2 (the claim of the queued row, as the redelivered message would).
    with session_scope() as session:
        claimed = evaluations.claim_evaluation(session=session, evaluation_id=dead, worker="w:2", stale_before=0)
    assert isinstance(claimed, str)  # the seeded job has no adapter: the claim fails it, but it did take it
    assert (_row(dead).attempt, _row(dead).status) == (2, "failed")


def test_dead_attempt_at_the_cap_is_failed_with_the_reason(reconciler_env: Settings) -> None:
    job_id = _job()
    last_try = _evaluation(job_id, status="running", attempt=3, worker="gone:3", heartbeat_at=now() - 100)

    report = reconcile_once(reconciler_env)

    assert report.evaluations_failed == [last_try] and report.evaluations_requeued == []
    row = _row(last_try)
    assert row.status == "failed" and row.finished_at is not None and row.worker is None
    assert row.error is not None
    assert "the worker stopped answering (no heartbeat for 6 s) on attempt 3 of 3" in row.error
    errors = [event for event in job_events(job_id) if event.level == "error"]
    assert len(errors) == 1 and errors[0].data == {"evaluation_id": last_try, "attempt": 3}
    assert errors[0].message.startswith(f"Evaluation {last_try} failed: the worker stopped answering")
    assert errors[0].attempt == 1  # the job's attempt: the event belongs to the job's last run
    assert _messages() == []
    assert not reconcile_once(reconciler_env).changed()


def test_live_and_finished_evaluations_are_left_alone(reconciler_env: Settings) -> None:
    job_id = _job()
    alive = _evaluation(job_id, status="running", attempt=1, worker="here:1", heartbeat_at=now())
    done = _evaluation(job_id, status="succeeded", attempt=1, heartbeat_at=now() - 100, finished_at=now() - 100,
                       results={"pass_at_k": {"pass@1": 1.0}})
    failed = _evaluation(job_id, status="failed", attempt=3, heartbeat_at=now() - 100, finished_at=now() - 100,
                         error="it broke")
    never_sent = _evaluation(job_id, status="failed", error="The job failed")  # no heartbeat at all
    training = _job(status="running")
    waiting_for_training = _evaluation(training)  # follows training: sent when the job succeeds
    just_succeeded = _job(finished_at=now())
    just_sent = _evaluation(just_succeeded)  # created long ago, sent when its job succeeded a moment ago
    asked_now = _evaluation(job_id, created_at=now())  # asked for on a succeeded job a moment ago
    before = {evaluation_id: _row(evaluation_id) for evaluation_id in
              (alive, done, failed, never_sent, waiting_for_training, just_sent, asked_now)}

    report = reconcile_once(reconciler_env)

    assert report == ReconcileReport()
    for evaluation_id, row in before.items():
        after = _row(evaluation_id)
        assert (after.status, after.attempt, after.heartbeat_at, after.error, after.results, after.finished_at) == (
            row.status, row.attempt, row.heartbeat_at, row.error, row.results, row.finished_at), evaluation_id
    assert _messages() == []
    assert job_events(job_id) == [] and job_events(training) == [] and job_events(just_succeeded) == []


def test_lost_message_is_sent_again_once(reconciler_env: Settings) -> None:
    job_id = _job()
    lost = _evaluation(job_id)

    report = reconcile_once(reconciler_env)

    assert report.evaluations_resent == [lost] and _messages() == [lost]
    assert _row(lost).status == "queued" and _row(lost).attempt == 0
    # Not again before the expiry, and not while its message waits.
    assert reconcile_once(reconciler_env).evaluations_resent == []
    assert _messages() == [lost]
    # The expiry passes and the message is gone again (Redis restarted without persistence): sent again.
    redis.Redis.from_url(BROKER_URL).flushdb()
    with session_scope() as session:
        session.execute(update(Evaluation).where(Evaluation.id == lost).values(heartbeat_at=now() - 100))
    assert reconcile_once(reconciler_env).evaluations_resent == [lost]
    assert _messages() == [lost]


def test_stale_queued_with_its_message_waiting_is_not_sent_again(reconciler_env: Settings) -> None:
    waiting = _evaluation(_job())
    enqueue_evaluation(waiting)  # the workers are just busy: its message is on the broker

    assert reconcile_once(reconciler_env).evaluations_resent == []
    assert _messages() == [waiting]


def test_two_racing_reconcilers_change_it_once(reconciler_env: Settings) -> None:
    job_id = _job()
    dead = _evaluation(job_id, status="running", attempt=1, worker="gone:1", heartbeat_at=now() - 100)
    last_try = _evaluation(job_id, status="running", attempt=3, worker="gone:3", heartbeat_at=now() - 100)
    lost = _evaluation(job_id)
    start = threading.Barrier(2)
    reports: list[ReconcileReport] = []
    errors: list[BaseException] = []

    def one_pass() -> None:
        try:
            start.wait(5)
            reports.append(reconcile_once(reconciler_env))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=one_pass) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sorted(sum((report.evaluations_requeued for report in reports), [])) == [dead]
    assert sorted(sum((report.evaluations_failed for report in reports), [])) == [last_try]
    assert sorted(sum((report.evaluations_resent for report in reports), [])) == [lost]
    assert (_row(dead).status, _row(dead).attempt) == ("queued", 1)
    assert _row(last_try).status == "failed"
    assert sorted(_messages()) == sorted([dead, lost])
    data = [event.data for event in job_events(job_id)]
    assert data.count({"evaluation_id": dead, "attempt": 1}) == 1
    assert data.count({"evaluation_id": last_try, "attempt": 3}) == 1


def test_the_conditional_updates_refuse_the_loser(reconciler_env: Settings) -> None:
    """The writes under the reconciler: once one reconciler moved a row, the other's identical write does nothing."""
    job_id = _job()
    dead = _evaluation(job_id, status="running", attempt=2, heartbeat_at=now() - 100)
    lost = _evaluation(job_id)
    with session_scope() as session:
        assert evaluations.expired_evaluations(session=session, expiry_seconds=6) == [(dead, 2, job_id, 1)]
        assert evaluations.unclaimed_queued_evaluations(session=session, older_than_seconds=6) == [lost]
        assert evaluations.count_sendable_queued(session=session) == 1
    for expected in (True, False):
        with session_scope() as session:
            assert evaluations.expire_attempt(session=session, evaluation_id=dead, attempt=2, expiry_seconds=6,
                                              status="queued") is expected
        with session_scope() as session:
            assert evaluations.ring_again(session=session, evaluation_id=lost, older_than_seconds=6) is expected
    # A newer attempt's write is fenced off too: a reclaimed evaluation is not expired by the old attempt number.
    with session_scope() as session:
        session.execute(update(Evaluation).where(Evaluation.id == dead)
                        .values(status="running", attempt=3, heartbeat_at=now() - 100))
    with session_scope() as session:
        assert not evaluations.expire_attempt(session=session, evaluation_id=dead, attempt=2, expiry_seconds=6,
                                              status="failed", error="x")
