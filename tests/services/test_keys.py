"""API keys: printed once by the CLI, stored only as a hash, revocable."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from backend import cli
from backend.config import get_settings
from backend.db.models import ApiKey, Project
from backend.db.session import set_engine


@pytest.fixture
def process_engine(db_engine: Engine, database_url: str) -> Iterator[Engine]:
    """Make the test database the process's (the CLI uses session_scope())."""
    previous = os.environ.get("SAFETRAIN_DATABASE_URL")
    os.environ["SAFETRAIN_DATABASE_URL"] = database_url
    get_settings.cache_clear()
    set_engine(db_engine)
    yield db_engine
    set_engine(None)
    if previous is None:
        os.environ.pop("SAFETRAIN_DATABASE_URL", None)
    else:
        os.environ["SAFETRAIN_DATABASE_URL"] = previous
    get_settings.cache_clear()


def test_cli_prints_only_the_key_and_stores_only_its_hash(
    process_engine: Engine, session: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "create", "--project", "research"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    key = out.strip()
    assert key.startswith("sk-st-") and len(key) > 40
    row = session.scalars(select(ApiKey)).one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in {row.key_hash, row.prefix, row.id} and key.startswith(row.prefix)
    assert session.scalars(select(Project.name)).all() == ["research"]

    from backend.services.keys import project_for_key

    project = project_for_key(session, key)
    assert project is not None and project.name == "research"
    assert project_for_key(session, key + "x") is None

    assert cli.main(["keys", "create", "--project", "research"]) == 0  # a second key, same project
    second = capsys.readouterr().out.strip()
    assert second != key and session.scalar(select(Project.id).where(Project.name == "research")) == project.id

    assert cli.main(["keys", "revoke", key]) == 0
    session.expire_all()
    assert project_for_key(session, key) is None
    assert project_for_key(session, second) is not None
    capsys.readouterr()
    assert cli.main(["keys", "revoke", key]) == 1  # already revoked: said on stderr, exit 1, no traceback
    assert "no active API key matches" in capsys.readouterr().err
