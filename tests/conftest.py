"""Shared service fixtures: a migrated database on SQLite and on PostgreSQL, settings, the app, API keys.

The database fixtures are parametrized: every test that uses them runs once on SQLite (WAL) and once on
PostgreSQL (a fresh schema in the `test` database, dropped afterwards). Tables are emptied after each
test rather than rolled back, because the app under test commits through its own connections.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from backend.config import Settings, get_settings
from backend.db.migrations import downgrade_to_base, upgrade_to_head
from backend.db.models import Base
from backend.db.session import make_engine
from backend.library_noise import silence_library_noise
from tests.support.databases import POSTGRES_URL

REDIS_URL = os.environ.get("SAFETRAIN_TEST_REDIS", "redis://127.0.0.1:6379/15")

# A GPT-2 shaped config small enough to plan instantly; the weights file only has to exist.
TINY_GPT2_CONFIG = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_head": 2, "n_layer": 1,
    "n_positions": 128, "vocab_size": 508, "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": True,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05, "dtype": "float32",
}


@pytest.fixture(autouse=True)
def _library_noise_silenced() -> None:
    """The package's warning filters, in the test: pytest gives each test the filters it had before collection
    imported `backend`, which drops the ones the package installed on import."""
    silence_library_noise()


def _postgres_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL to an empty database: SQLite in a temp folder, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'safetrain.db'}"
        return
    if not _postgres_reachable():
        pytest.skip(f"PostgreSQL is not running at {POSTGRES_URL} (.ci/run starts it)")
    schema = f"safetrain_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def migrated_engine(database_url: str) -> Iterator[Engine]:
    """An engine on the database, brought to the latest migration (Alembic, never create_all)."""
    engine = make_engine(database_url)
    upgrade_to_head(engine)
    yield engine
    downgrade_to_base(engine)
    engine.dispose()


@pytest.fixture
def db_engine(migrated_engine: Engine) -> Iterator[Engine]:
    """The migrated engine; every table is emptied after the test."""
    yield migrated_engine
    with migrated_engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture
def session(db_engine: Engine) -> Iterator[Session]:
    """A session on the test database."""
    with Session(db_engine, expire_on_commit=False) as db_session:
        yield db_session


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with one base model, `tiny-gpt2` (config.json and a safetensors file)."""
    root = tmp_path_factory.mktemp("models")
    folder = root / "tiny-gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_GPT2_CONFIG))
    (folder / "model.safetensors").write_bytes(b"")
    return root


@pytest.fixture(scope="session")
def redis_broker() -> Iterator[str]:
    """This suite's own Redis database (15), emptied before and after: no worker consumes it."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def broker_env(monkeypatch: pytest.MonkeyPatch, redis_broker: str) -> Iterator[str]:
    """Point the process-wide settings (read by the dispatcher) at the test Redis database, for one test."""
    monkeypatch.setenv("SAFETRAIN_BROKER_URL", redis_broker)
    get_settings.cache_clear()
    yield redis_broker
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def settings(database_url: str, db_engine: Engine, models_dir: Path, tmp_path: Path, broker_env: str) -> Settings:
    """Settings for one test: its own data folder, the test database, Redis db 15 as the broker."""
    return Settings(
        data_dir=tmp_path / "var",
        models_dir=models_dir,
        database_url=database_url,
        broker_url=broker_env,
        max_upload_bytes=256 * 1024,
        max_line_bytes=16 * 1024,
    )
