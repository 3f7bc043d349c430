"""Engines and sessions: one engine per process, SQLite tuned for concurrent readers (WAL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from backend.config import get_settings

# The pool keeps a connection for each of the API's 40 worker threads: with fewer, every request past the
# tenth at once opened and closed a connection of its own (a third of a polled request's cost under load).
# Connections open on demand, so a quiet process holds few.
POOL_SIZE = {"pool_size": 40, "max_overflow": 10}

_lock = threading.Lock()
_engine: Engine | None = None
_session_factory: sessionmaker[Session] | None = None


def _set_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker writes; busy_timeout waits for the writer instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """A new engine for `url`; SQLite gets WAL, a busy timeout and foreign keys."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **POOL_SIZE)
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **POOL_SIZE)


def get_engine() -> Engine:
    """The process's engine, built on first use from the settings."""
    global _engine, _session_factory
    with _lock:
        if _engine is None:
            _engine = make_engine(get_settings().database_url)
            _session_factory = sessionmaker(bind=_engine, expire_on_commit=False)
        return _engine


def get_session_factory() -> sessionmaker[Session]:
    """The process's session factory."""
    get_engine()
    assert _session_factory is not None
    return _session_factory


def set_engine(engine: Engine | None) -> None:
    """Use `engine` for this process (tests, embedded mode); None forgets the current one."""
    global _engine, _session_factory
    with _lock:
        _engine = engine
        _session_factory = sessionmaker(bind=engine, expire_on_commit=False) if engine is not None else None


def dispose_engine() -> None:
    """Drop pooled connections, as a forked child must before it touches the database."""
    with _lock:
        if _engine is not None:
            # close=False leaves the parent's connections alone; the engine opens fresh ones here.
            _engine.dispose(close=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
