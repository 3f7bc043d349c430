"""The reconciler: make SQL and the broker agree again after a lost message or a dead worker.

Each pass (every `heartbeat_seconds`):
- a running (or validating) job whose heartbeat is older than `heartbeat_expiry_seconds` lost its
  worker: it goes back to `queued` and is sent again, so its next attempt resumes from the last complete
  checkpoint in its work folder; after `max_attempts` attempts it is `failed` with the reason instead
  (a pending cancel or pause is honoured rather than retried);
- a queued job that no worker claimed for `heartbeat_expiry_seconds` since its message was last sent
  may have lost that message (a Redis restart without persistence, a send that failed after the API's
  commit): when the broker's queue holds fewer messages than there are queued jobs, it is sent again.
  A duplicate message costs nothing: the claim is a conditional UPDATE, so only one ever runs;
- evaluations are repaired the same way: a running evaluation whose heartbeat expired goes back to
  `queued` and is sent again (it starts over: an evaluation keeps no checkpoints), or is `failed` with
  the reason once its attempt count reached `max_attempts`; a queued evaluation of a succeeded job that
  no worker claimed for `heartbeat_expiry_seconds` since its message was last sent is sent again (the
  same broker check as for jobs, counting both kinds of waiting message).

Why a thread in every worker rather than Celery beat: beat is one more process to deploy and to keep
exactly one of, and when it is down nothing is reconciled; a loop in each worker needs nothing extra
(`safetrain worker` and `safetrain up` run it), survives as long as any worker does, and many of them
at once are safe because each repair is a conditional UPDATE that exactly one reconciler wins.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.session import session_scope
from backend.services import evaluations, job_runs

logger = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """What one pass did, by job id (and, for evaluations, by evaluation id)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    evaluations_requeued: list[str] = field(default_factory=list)
    evaluations_failed: list[str] = field(default_factory=list)
    evaluations_resent: list[str] = field(default_factory=list)

    def changed(self) -> bool:
        """Whether the pass repaired anything."""
        return any((self.requeued, self.failed, self.stopped, self.resent, self.evaluations_requeued,
                    self.evaluations_failed, self.evaluations_resent))


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


def _every_message_waiting() -> bool:
    """Whether the broker's queue holds at least one message per queued job and sendable evaluation (they
    share the queue): then nothing was lost and the workers are just busy."""
    from backend.workers.dispatch import queue_depth

    with session_scope() as session:
        waiting = job_runs.count_queued_jobs(session=session) + evaluations.count_sendable_queued(session=session)
    depth = queue_depth()
    return depth is not None and depth >= waiting


def resend_lost_messages(settings: Settings, report: ReconcileReport) -> list[str]:
    """Queued jobs unclaimed for too long whose message may be gone; return the ids to send again."""
    wait = settings.heartbeat_expiry_seconds
    with session_scope() as session:
        stale = job_runs.unclaimed_queued_jobs(session=session, older_than_seconds=wait)
    to_send = _ring_again_each(
        stale, lambda session, job_id: job_runs.ring_again(session=session, job_id=job_id, older_than_seconds=wait)
    )
    report.resent += to_send
    return to_send


def _ring_again_each(stale: list[str], ring_again: Callable[[Session, str], bool]) -> list[str]:
    """The stale rows `ring_again` marks for a new message, each in its own transaction; none while the broker
    still holds a message for every queued row."""
    if not stale or _every_message_waiting():
        return []
    to_send = []
    for row_id in stale:
        with session_scope() as session:
            if ring_again(session, row_id):
                to_send.append(row_id)
    return to_send


def _expire_evaluation(settings: Settings, evaluation_id: str, attempt: int, job_id: str, job_attempt: int
                       ) -> str | None:
    """Expire one silent evaluation attempt (and say so on its job) in one transaction; the status it moved
    to, or None when it was alive or another reconciler got there first."""
    expiry, cap = settings.heartbeat_expiry_seconds, settings.max_attempts
    cause = f"the worker stopped answering (no heartbeat for {expiry} s) on attempt {attempt} of {cap}"
    status, error = ("failed", f"Gave up: {cause}.") if attempt >= cap else ("queued", None)
    with session_scope() as session:
        if not evaluations.expire_attempt(session=session, evaluation_id=evaluation_id, attempt=attempt,
                                          expiry_seconds=expiry, status=status, error=error):
            return None
        if status == "failed":
            message, level = f"Evaluation {evaluation_id} failed: {cause}", "error"
        else:
            message, level = f"Evaluation {evaluation_id}: {cause}; queued again", "warn"
        evaluations.append_job_event(session=session, job_id=job_id, attempt=job_attempt, message=message,
                                     level=level, data={"evaluation_id": evaluation_id, "attempt": attempt})
    return status


def expire_dead_evaluations(settings: Settings, report: ReconcileReport) -> list[str]:
    """Move evaluations with an expired heartbeat on; return the ids to send again."""
    with session_scope() as session:
        expired = evaluations.expired_evaluations(session=session,
                                                  expiry_seconds=settings.heartbeat_expiry_seconds)
    to_send = []
    for evaluation_id, attempt, job_id, job_attempt in expired:
        status = _expire_evaluation(settings, evaluation_id, attempt, job_id, job_attempt)
        if status is None:
            continue
        logger.warning("evaluation %s attempt %s: heartbeat expired; now %s", evaluation_id, attempt, status)
        if status == "queued":
            report.evaluations_requeued.append(evaluation_id)
            to_send.append(evaluation_id)
        else:
            report.evaluations_failed.append(evaluation_id)
    return to_send


def resend_lost_evaluations(settings: Settings, report: ReconcileReport) -> list[str]:
    """Queued evaluations of succeeded jobs unclaimed for too long whose message may be gone; the ids to send."""
    wait = settings.heartbeat_expiry_seconds
    with session_scope() as session:
        stale = evaluations.unclaimed_queued_evaluations(session=session, older_than_seconds=wait)
    to_send = _ring_again_each(
        stale,
        lambda session, evaluation_id: evaluations.ring_again(
            session=session, evaluation_id=evaluation_id, older_than_seconds=wait
        ),
    )
    report.evaluations_resent += to_send
    return to_send


def reconcile_once(settings: Settings) -> ReconcileReport:
    """One pass: expire dead attempts, re-send lost messages; for jobs, then for evaluations."""
    from backend.workers.dispatch import send_or_raise
    from backend.workers.evaluation_dispatch import enqueue_evaluation

    report = ReconcileReport()
    to_send = expire_dead_attempts(settings, report)
    to_send += resend_lost_messages(settings, report)
    for job_id in to_send:
        try:
            send_or_raise(job_id)
        except Exception:
            # Still queued in SQL: the next pass after the expiry sends it again.
            logger.exception("reconciler: could not send job %s", job_id)
    evaluations_to_send = expire_dead_evaluations(settings, report)
    evaluations_to_send += resend_lost_evaluations(settings, report)
    for evaluation_id in evaluations_to_send:
        # A failed send is logged there; the evaluation stays queued with heartbeat_at as its send time,
        # so the next pass after the expiry sends it again.
        enqueue_evaluation(evaluation_id)
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
                if report.changed():
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
