"""Polling with a deadline, failing with what was awaited and the logs that explain why it never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol


class LogSource(Protocol):
    """Something that ran and kept a log (a worker stack)."""

    def log_tail(self) -> str:
        """The end of its log."""
        ...


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, stack: LogSource | None = None, *,
             interval: float = 0.2, logs: Callable[[], str] | None = None) -> Any:
    """Poll until predicate() is truthy; return its value, or fail naming `what` (with `logs()` or the stack's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    detail = logs() if logs is not None else stack.log_tail() if stack is not None else None
    message = f"timed out after {timeout:.0f} s waiting for {what}"
    raise AssertionError(message if detail is None else f"{message}\n--- log ---\n{detail}")
