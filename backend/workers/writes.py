"""Worker writes: each its own short transaction, retried while the database is briefly unreachable.

A refused fence (StaleAttemptError) or any other error is raised at once; only a lost connection is waited
for, until `retry_seconds` pass, so an attempt gives up (and kills its child) before its heartbeat expires.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

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
