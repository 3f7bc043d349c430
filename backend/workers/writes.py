"""Worker writes: each its own short transaction, retried while the database is briefly unreachable.

A refused fence (StaleAttemptError) or any other error is raised at once; only a lost connection is waited
for, until `retry_seconds` pass, so an attempt gives up (and kills its child) before its heartbeat expires.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import now
from backend.db.session import session_scope

logger = logging.getLogger(__name__)

T = TypeVar("T")


def with_retry(write: Callable[[Session], T], *, retry_seconds: float = 60.0) -> T:
    """Run `write` in a session_scope, retrying while the database is unreachable (not on a refused fence)."""
    deadline = time.monotonic() + retry_seconds
    delay = 0.2
    while True:
        try:
            with session_scope() as session:
                return write(session)
        except DBAPIError as exc:
            transient = isinstance(exc, OperationalError) or exc.connection_invalidated
            if not transient or time.monotonic() >= deadline:
                raise
            logger.warning("database write failed (%s); retrying in %.1fs", exc.__class__.__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def worker_name() -> str:
    """This worker process as a lease names it: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_attempt(claim: Callable[..., T | str], *, settings: Settings, log: logging.Logger, label: str) -> T | None:
    """Claim a row for this worker with `claim(session=, worker=, stale_before=)` (retried), or log why not."""
    worker = worker_name()
    stale_before = now() - int(settings.heartbeat_expiry_seconds)
    claimed = with_retry(lambda s: claim(session=s, worker=worker, stale_before=stale_before))
    if isinstance(claimed, str):
        log.info("%s: not run (%s)", label, claimed)
        return None
    return claimed
