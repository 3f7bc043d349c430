"""What every leased row's fence is built from: the database's clock and the refused write.

Heartbeats are stamped with the database server's clock and expiry is judged by the same clock, so workers
on machines whose clocks disagree never see each other's heartbeats as expired early.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ColumnElement, func
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement


class database_now(FunctionElement[int]):  # noqa: N801 - reads as the SQL function it is
    """The database server's current time in integer Unix seconds."""

    type = BigInteger()
    inherit_cache = True


@compiles(database_now)
def _database_now_postgresql(element: database_now, compiler: Any, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM CURRENT_TIMESTAMP) AS BIGINT)"


@compiles(database_now, "sqlite")
def _database_now_sqlite(element: database_now, compiler: Any, **kw: Any) -> str:
    return "CAST(strftime('%s', 'now') AS INTEGER)"


def silent_for(column: Any, seconds: int) -> ColumnElement[bool]:
    """`column` (a database-clock timestamp, NULL as 0) is more than `seconds` old."""
    return func.coalesce(column, 0) < database_now() - seconds


class StaleAttemptError(RuntimeError):
    """A write from an attempt that no longer owns its row (requeued, reclaimed, finished or deleted)."""

    def __init__(self, row_id: str, attempt: int, kind: str = "job") -> None:
        super().__init__(f"{kind} {row_id}: attempt {attempt} no longer owns the {kind}; write refused")
        self.row_id = row_id
        self.attempt = attempt
        self.kind = kind
