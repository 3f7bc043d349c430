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
  same broker check as for jobs, counting both kinds of waiting message);
- exports likewise (services/export_runs.py): a silent one is requeued (it merges again from the start),
  cancelled when a cancel was pending, or failed at `max_attempts`; a queued one is sent again.

Why a thread in every worker rather than Celery beat: beat is one more process to deploy and to keep
exactly one of, and when it is down nothing is reconciled; a loop in each worker needs nothing extra
(`safetrain worker` and `safetrain up` run it), survives as long as any worker does, and many of them
at once are safe because each repair is a conditional UPDATE that exactly one reconciler wins.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, fields

from backend.config import Settings
from backend.db.session import session_scope
from backend.db.statuses import JobStatus
from backend.services import lease
from backend.services.evaluation_runs import EVALUATIONS
from backend.services.export_runs import EXPORTS
from backend.services.job_runs import JOBS
from backend.services.lease import LeaseKind
from backend.workers.dispatch import queue_depth, send

logger = logging.getLogger(__name__)

# Every kind of leased work the reconciler repairs, and the prefix of its lists in the report.
LEASED_KINDS: tuple[tuple[LeaseKind, str], ...] = ((JOBS, ""), (EVALUATIONS, "evaluations_"), (EXPORTS, "exports_"))
# The report's list for each status a silent attempt moves to (an evaluation's statuses compare equal to these).
_REPORTED: dict[str, str] = {JobStatus.QUEUED: "requeued", JobStatus.FAILED: "failed", JobStatus.CANCELLED: "stopped",
                             JobStatus.PAUSED: "stopped"}


@dataclass
class ReconcileReport:
    """What one pass did, by job id (and, for evaluations and exports, by their ids)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    evaluations_requeued: list[str] = field(default_factory=list)
    evaluations_failed: list[str] = field(default_factory=list)
    evaluations_resent: list[str] = field(default_factory=list)
    exports_requeued: list[str] = field(default_factory=list)
    exports_failed: list[str] = field(default_factory=list)
    exports_stopped: list[str] = field(default_factory=list)
    exports_resent: list[str] = field(default_factory=list)

    def changed(self) -> bool:
        """Whether the pass repaired anything."""
        return any(getattr(self, column.name) for column in fields(self))

    def note(self, prefix: str, what: str, row_id: str) -> None:
        """Add `row_id` to the list `prefix + what` (requeued, failed, stopped, resent)."""
        getattr(self, prefix + what).append(row_id)


def expire_dead_attempts(settings: Settings, kind: LeaseKind, prefix: str, report: ReconcileReport) -> list[str]:
    """Move the kind's attempts with an expired heartbeat on, each in its own transaction; the ids to send again."""
    expiry = settings.heartbeat_expiry_seconds
    with session_scope() as session:
        silent = kind.silent_attempts(session=session, expiry_seconds=expiry)
    to_send = []
    for attempt in silent:
        with session_scope() as session:
            status = kind.expire_silent(session=session, silent=attempt, expiry_seconds=expiry,
                                        max_attempts=settings.max_attempts)
        if status is None:
            continue  # it heartbeat in the meantime, or another reconciler got there first
        logger.warning("%s %s attempt %s: heartbeat expired; now %s", kind.name, attempt.id, attempt.attempt, status)
        report.note(prefix, _REPORTED[status], attempt.id)
        if _REPORTED[status] == "requeued":
            to_send.append(attempt.id)
    return to_send


def _every_message_waiting() -> bool:
    """Whether the broker's queue holds at least one message per sendable row of every kind (they share the
    queue): then nothing was lost and the workers are just busy."""
    with session_scope() as session:
        waiting = sum(lease.count_sendable(session=session, kind=kind) for kind, _ in LEASED_KINDS)
    depth = queue_depth()
    return depth is not None and depth >= waiting


def resend_lost_messages(settings: Settings, kind: LeaseKind, prefix: str, report: ReconcileReport) -> list[str]:
    """The kind's sendable rows unclaimed for too long whose message may be gone, each marked in its own
    transaction; none while the broker still holds a message for every sendable row. The ids to send again."""
    wait = settings.heartbeat_expiry_seconds
    with session_scope() as session:
        stale = lease.unsent_for(session=session, kind=kind, older_than_seconds=wait)
    if not stale or _every_message_waiting():
        return []
    to_send = []
    for row_id in stale:
        with session_scope() as session:
            if lease.ring_again(session=session, kind=kind, row_id=row_id, older_than_seconds=wait):
                to_send.append(row_id)
                report.note(prefix, "resent", row_id)
    return to_send


def reconcile_once(settings: Settings) -> ReconcileReport:
    """One pass over every kind: expire dead attempts, re-send lost messages."""
    report = ReconcileReport()
    for kind, prefix in LEASED_KINDS:
        to_send = expire_dead_attempts(settings, kind, prefix, report)
        to_send += resend_lost_messages(settings, kind, prefix, report)
        for row_id in to_send:
            # A failed send is logged there; the row stays queued with heartbeat_at as its send time, so the
            # next pass after the expiry sends it again.
            send(kind.task_name, row_id)
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
