"""Leased work: a row in SQL that one worker at a time holds, as a numbered attempt, while it heartbeats.

Jobs and evaluations (and any later kind) are leased the same way, parameterised by a `LeaseKind`:
- a worker claims a row with a conditional UPDATE that raises `attempt` (so a duplicate message is harmless);
- from then on each write it makes first updates the row under the fence `id = :id AND attempt = :attempt
  AND status IN (active statuses)`, stamping `heartbeat_at` with the database's clock; when the fence matches
  no row (the reconciler requeued it, another worker reclaimed it, it finished or was deleted) the write
  raises StaleAttemptError, so a stale attempt can never overwrite the live one. The fenced UPDATE comes
  first in each transaction, so the row lock (PostgreSQL) or the write lock (SQLite) is held before
  anything dependent is inserted;
- the reconciler expires attempts silent for longer than the expiry, and re-sends the message of a queued
  row that waited unclaimed since its message was last sent (`heartbeat_at` of a queued row is that send
  time). Each of its writes is conditional, so any number of reconcilers may run at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from backend.db.fence import StaleAttemptError, database_now, silent_for
from backend.db.models import Evaluation, Export, Job
from backend.db.statuses import can_move


@dataclass(frozen=True)
class LeaseKind:
    """One kind of leased work: its table, the statuses an attempt holds it in, and its Celery task."""

    name: str  # "job", "evaluation", "export": named in StaleAttemptError
    model: type[Job] | type[Evaluation] | type[Export]
    active: tuple[StrEnum, ...]
    task_name: str
    # Queued rows that ought to have a message waiting on the broker.
    sendable: Callable[[], ColumnElement[bool]]
    # Those rows' message was last sent more than `seconds` ago.
    sent_before: Callable[[int], ColumnElement[bool]]
    # The reconciler's rule: the attempts silent for the expiry (`session=`, `expiry_seconds=`), each with an
    # `id` and an `attempt`, and what one of them becomes (`session=`, `silent=`, `expiry_seconds=`,
    # `max_attempts=`): the status it moved to, or None when it was alive or another reconciler got there first.
    silent_attempts: Callable[..., Sequence[Any]]
    expire_silent: Callable[..., StrEnum | None]


def fence(kind: LeaseKind, row_id: str, attempt: int) -> ColumnElement[bool]:
    """The row is still held by `attempt`."""
    model = kind.model
    return (model.id == row_id) & (model.attempt == attempt) & model.status.in_(kind.active)


def fenced_update(
    session: Session, kind: LeaseKind, row_id: str, attempt: int, *, returning: Any = None, **values: Any
) -> Any:
    """Update the row under the fence (a heartbeat too); return `returning`'s value, or raise StaleAttemptError."""
    values.setdefault("heartbeat_at", database_now())
    statement = (
        update(kind.model)
        .where(fence(kind, row_id, attempt))
        .values(**values)
        .returning(kind.model.id if returning is None else returning)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(statement).first()
    if row is None:
        raise StaleAttemptError(row_id, attempt, kind.name)
    return None if returning is None else row[0]


def claim(
    session: Session, kind: LeaseKind, row_id: str, *, worker: str, claimable: ColumnElement[bool], status: StrEnum,
    returning: tuple[Any, ...] = (), **values: Any,
) -> Any:
    """Take a `claimable` row as the next attempt in `status`; the row (attempt, *returning), or None if not taken."""
    model = kind.model
    statement = (
        update(model)
        .where(model.id == row_id, claimable)
        .values(status=status, attempt=model.attempt + 1, worker=worker, heartbeat_at=database_now(), error=None,
                **values)
        .returning(model.attempt, *returning)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).first()


def _move(kind: LeaseKind, status: str) -> StrEnum:
    """`status` as the kind's member, refused (ValueError) when the transitions table has no move to it."""
    target = type(kind.active[0])(status)
    if not can_move(kind.active, target):
        raise ValueError(f"a {kind.name} attempt cannot move to {target}")
    return target


def finish(session: Session, kind: LeaseKind, row_id: str, attempt: int, *, status: str, **values: Any) -> Any:
    """Move the held row to `status` under the fence (StaleAttemptError when the attempt lost it)."""
    return fenced_update(session, kind, row_id, attempt, status=_move(kind, status), **values)


def silent(kind: LeaseKind, expiry_seconds: int) -> ColumnElement[bool]:
    """The row is held by an attempt with no heartbeat for `expiry_seconds`."""
    return kind.model.status.in_(kind.active) & silent_for(kind.model.heartbeat_at, expiry_seconds)


def expire(
    session: Session, kind: LeaseKind, row_id: str, attempt: int, *, expiry_seconds: int, status: str,
    **values: Any,
) -> bool:
    """Move an attempt silent for `expiry_seconds` to `status`; False when it heartbeat meanwhile or was taken."""
    statement = (
        update(kind.model)
        .where(fence(kind, row_id, attempt), silent_for(kind.model.heartbeat_at, expiry_seconds))
        .values(status=_move(kind, status), worker=None, heartbeat_at=database_now(), **values)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount == 1  # type: ignore[attr-defined]


def unsent_for(*, session: Session, kind: LeaseKind, older_than_seconds: int, limit: int = 100) -> list[str]:
    """Sendable rows whose message was last sent more than `older_than_seconds` ago, oldest first."""
    model = kind.model
    query = select(model.id).where(kind.sendable(), kind.sent_before(older_than_seconds))
    return list(session.scalars(query.order_by(model.seq).limit(limit)))


def count_sendable(*, session: Session, kind: LeaseKind) -> int:
    """How many rows wait for a worker (each should have a message waiting)."""
    return int(session.scalar(select(func.count()).select_from(kind.model).where(kind.sendable())) or 0)


def ring_again(*, session: Session, kind: LeaseKind, row_id: str, older_than_seconds: int) -> bool:
    """Note that a sendable row's message is sent again now; False when another reconciler just did."""
    statement = (
        update(kind.model)
        .where(kind.model.id == row_id, kind.sendable(), kind.sent_before(older_than_seconds))
        .values(heartbeat_at=database_now())
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount == 1  # type: ignore[attr-defined]
