"""The reconciler's export pass: a silent attempt requeued (and sent), failed at the cap, or cancelled when a
cancel was pending; a lost message sent again once; live and finished exports left alone."""

from __future__ import annotations

import base64
import json
import uuid

import redis
from sqlalchemy import select, update

from backend.config import Settings
from backend.db.models import Export, Job, Project, now
from backend.db.session import session_scope
from backend.services import export_runs
from backend.services.export_runs import RUN_EXPORT
from backend.workers.celery_app import QUEUE
from backend.workers.reconciler import ReconcileReport, reconcile_once
from tests.workers.conftest import RECONCILER_REDIS_URL as BROKER_URL
from tests.workers.conftest import job_events, load_row


def _job() -> str:
    """A job that succeeded 100 s ago."""
    with session_scope() as session:
        project = Project(name=f"reconcile-exports-{uuid.uuid4().hex}")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="tiny-gpt2", training_file_id="file-x", hyperparameters={},
                  training={}, result_files=[], status="succeeded", attempt=1, finished_at=now() - 100)
        session.add(job)
        session.flush()
        return job.id


def _export(job_id: str, **values: object) -> str:
    """An export row as the API writes it, with `values`."""
    with session_scope() as session:
        project_id = session.scalar(select(Job.project_id).where(Job.id == job_id))
        row = Export(job_id=job_id, project_id=project_id, format="merged",
                     **{"status": "queued", "created_at": now() - 100, **values})
        session.add(row)
        session.flush()
        return row.id


def _row(export_id: str) -> Export:
    return load_row(Export, export_id)


def _messages() -> list[str]:
    """The export ids of the task messages waiting in Redis db 10 (every one a run_export message)."""
    ids = []
    for raw in redis.Redis.from_url(BROKER_URL).lrange(QUEUE, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == RUN_EXPORT
        ids.append(json.loads(base64.b64decode(message["body"]))[0][0])
    return ids


def _silent(job_id: str, attempt: int, **values: object) -> str:
    return _export(job_id, status="running", attempt=attempt, worker=f"gone:{attempt}", heartbeat_at=now() - 100,
                   **values)


def test_a_silent_export_attempt_is_requeued_and_sent(reconciler_env: Settings) -> None:
    job_id = _job()
    dead = _silent(job_id, 1)

    report = reconcile_once(reconciler_env)

    assert report.exports_requeued == [dead]
    assert report.exports_failed == report.exports_resent == report.requeued == report.evaluations_requeued == []
    row = _row(dead)
    assert (row.status, row.attempt, row.worker, row.error, row.finished_at) == ("queued", 1, None, None, None)
    assert row.heartbeat_at is not None and row.heartbeat_at >= now() - 2  # when its message was sent again
    assert _messages() == [dead]
    warnings = [event for event in job_events(job_id) if event.level == "warn"]
    assert len(warnings) == 1 and warnings[0].data == {"export_id": dead, "attempt": 1}
    assert "no heartbeat for 6 s" in warnings[0].message and "attempt 1 of 3; queued again" in warnings[0].message

    assert not reconcile_once(reconciler_env).changed()  # queued with its message waiting: nothing to do
    # The redelivered message's claim takes it as attempt 2 (the seeded job has no adapter: the claim fails it).
    with session_scope() as session:
        claimed = export_runs.claim_export(session=session, export_id=dead, worker="w:2", stale_before=0)
    assert claimed == "the job has no adapter to export: it did not succeed"
    assert (_row(dead).attempt, _row(dead).status) == (2, "failed")


def test_a_silent_export_at_the_cap_fails_and_a_pending_cancel_is_honoured(reconciler_env: Settings) -> None:
    job_id = _job()
    last_try = _silent(job_id, 3)
    cancelling = _silent(job_id, 1, requested_action="cancel")

    report = reconcile_once(reconciler_env)

    assert report.exports_failed == [last_try] and report.exports_stopped == [cancelling]
    assert report.exports_requeued == [] and _messages() == []
    failed = _row(last_try)
    assert failed.status == "failed" and failed.finished_at is not None and failed.error is not None
    assert "the worker stopped answering (no heartbeat for 6 s) on attempt 3 of 3" in failed.error
    cancelled = _row(cancelling)
    assert (cancelled.status, cancelled.requested_action, cancelled.error) == ("cancelled", None, None)
    assert cancelled.finished_at is not None
    by_export = {(event.data or {}).get("export_id"): event for event in job_events(job_id)}
    assert by_export[last_try].level == "error" and by_export[cancelling].message.startswith(
        f"Export {cancelling} cancelled")
    assert not reconcile_once(reconciler_env).changed()


def test_a_lost_message_is_sent_again_once_and_live_or_finished_exports_are_left_alone(
    reconciler_env: Settings,
) -> None:
    job_id = _job()
    alive = _export(job_id, status="running", attempt=1, worker="here:1", heartbeat_at=now())
    done = _export(job_id, status="succeeded", attempt=1, heartbeat_at=now() - 100, finished_at=now() - 100,
                   file_id="file-merged")
    asked_now = _export(job_id, created_at=now())
    lost = _export(job_id)

    report = reconcile_once(reconciler_env)

    assert report == ReconcileReport(exports_resent=[lost])
    assert _messages() == [lost]
    assert reconcile_once(reconciler_env).exports_resent == []  # its message waits now
    for export_id in (alive, done, asked_now):
        assert _row(export_id).attempt == (0 if export_id == asked_now else 1)
    assert (_row(alive).status, _row(done).status, _row(asked_now).status) == ("running", "succeeded", "queued")
    redis.Redis.from_url(BROKER_URL).flushdb()  # Redis restarted without persistence, after the expiry
    with session_scope() as session:
        session.execute(update(Export).where(Export.id == lost).values(heartbeat_at=now() - 100))
    assert reconcile_once(reconciler_env).exports_resent == [lost]
