"""The reconciler: make SQL and the broker agree again after a lost message or a dead worker.

Each pass (every `heartbeat_seconds`):
- a running (or validating) job whose heartbeat is older than `heartbeat_expiry_seconds` lost its
  worker: it goes back to `queued` and is sent again, so its next attempt resumes from the last complete
  checkpoint in its work folder; after `max_attempts` attempts it is `failed` with the reason instead
  (a pending cancel or pause is honoured rather than retried);
- a queued job that no worker claimed for `heartbeat_expiry_seconds` since its message was last sent
  may have lost that message (a Redis restart without persistence, a send that failed after the API's
  commit): when the broker's queue holds fewer messages than there are queued jobs, it is sent again.
  A duplicate message costs nothing: the claim is a conditional UPDATE, so only one ever runs.

Why a thread in every worker rather than Celery beat: beat is one more process to deploy and to keep
exactly one of, and when it is down nothing is reconciled; a loop in each worker needs nothing extra
(`safetrain worker` and `safetrain up` run it), survives as long as any worker does, and many of them
at once are safe because each repair is a conditional UPDATE that exactly one reconciler wins.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from backend.config import Settings
from backend.db.session import session_scope
from backend.services import job_runs

logger = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """What one pass did, by job id."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)


def _expired_outcome(lost: int, action: str | None, max_attempts: int) -> tuple[str, dict[str, Any] | None]:
    """The status (and error) a job whose worker vanished moves to; `lost` counts this loss too."""
    if action == "cancel":
        return "cancelled", None
    if action == "pause":
        return "paused", None
    if lost >= max_attempts:
        message = (
            f"Gave up after {lost} lost attempts (max_attempts {max_attempts}); last: the worker stopped "
            "answering (no heartbeat)."
        )
        return "failed", {"code": "worker_lost", "message": message, "param": None}
    return "queued", None


def _expire(settings: Settings, job_id: str, attempt: int, action: str | None) -> str | None:
    """Expire one silent attempt in one transaction; the status it moved to, or None when it was alive."""
    expiry = settings.heartbeat_expiry_seconds
    with session_scope() as session:
        lost = job_runs.lost_attempts(session=session, job_id=job_id) + 1
        status, error = _expired_outcome(lost, action, settings.max_attempts)
        if not job_runs.expire_attempt(
            session=session, job_id=job_id, attempt=attempt, expiry_seconds=expiry, status=status, error=error
        ):
            return None  # it heartbeat in the meantime, or another reconciler got there first
        if status in ("queued", "failed"):
            reason = f"the worker running attempt {attempt} stopped answering (no heartbeat for {expiry} s)"
            job_runs.record_lost_attempt(session=session, job_id=job_id, attempt=attempt, reason=reason)
    return status


def expire_dead_attempts(settings: Settings, report: ReconcileReport) -> list[str]:
    """Move attempts with an expired heartbeat on; return the ids to send again."""
    with session_scope() as session:
        expired = job_runs.expired_attempts(session=session, expiry_seconds=settings.heartbeat_expiry_seconds)
    to_send = []
    for job_id, attempt, action in expired:
        status = _expire(settings, job_id, attempt, action)
        if status is None:
            continue
        logger.warning("job %s attempt %s: heartbeat expired; now %s", job_id, attempt, status)
        if status == "queued":
            report.requeued.append(job_id)
            to_send.append(job_id)
        elif status == "failed":
            report.failed.append(job_id)
        else:
            report.stopped.append(job_id)
    return to_send


def resend_lost_messages(settings: Settings, report: ReconcileReport) -> list[str]:
    """Queued jobs unclaimed for too long whose message may be gone; return the ids to send again."""
    from backend.workers.dispatch import queue_depth

    wait = settings.heartbeat_expiry_seconds
    with session_scope() as session:
        stale = job_runs.unclaimed_queued_jobs(session=session, older_than_seconds=wait)
        if not stale:
            return []
        waiting = job_runs.count_queued_jobs(session=session)
    depth = queue_depth()
    if depth is not None and depth >= waiting:
        return []  # every queued job still has a message waiting: the workers are just busy
    to_send = []
    for job_id in stale:
        with session_scope() as session:
            if job_runs.ring_again(session=session, job_id=job_id, older_than_seconds=wait):
                to_send.append(job_id)
    report.resent += to_send
    return to_send


def reconcile_once(settings: Settings) -> ReconcileReport:
    """One pass: expire dead attempts, re-send lost messages."""
    from backend.workers.dispatch import send_or_raise

    report = ReconcileReport()
    to_send = expire_dead_attempts(settings, report)
    to_send += resend_lost_messages(settings, report)
    for job_id in to_send:
        try:
            send_or_raise(job_id)
        except Exception:
            # Still queued in SQL: the next pass after the expiry sends it again.
            logger.exception("reconciler: could not send job %s", job_id)
    return report


class Reconciler(threading.Thread):
    """Runs reconcile_once every `heartbeat_seconds` until stopped."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="safetrain-reconciler", daemon=True)
        self.settings = settings
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                report = reconcile_once(self.settings)
                if report.requeued or report.failed or report.resent or report.stopped:
                    logger.info("reconciler: %s", report)
            except Exception:  # a database outage must not end the loop
                logger.exception("reconciler pass failed")
            self.stopping.wait(self.settings.heartbeat_seconds)


_reconciler: Reconciler | None = None


def start_reconciler(settings: Settings) -> Reconciler:
    """Start this process's reconciler thread (once)."""
    global _reconciler
    if _reconciler is None or not _reconciler.is_alive():
        _reconciler = Reconciler(settings)
        _reconciler.start()
    return _reconciler


def stop_reconciler() -> None:
    """Ask the reconciler thread to stop after its current pass."""
    if _reconciler is not None:
        _reconciler.stopping.set()
