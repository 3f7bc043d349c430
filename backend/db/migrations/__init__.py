"""Alembic, configured in code so migrations run from an installed package without an alembic.ini."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic Config pointing at this package's scripts, bound to `engine` (the process's by default)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def upgrade_to_head(engine: Engine | None = None) -> None:
    """Bring the schema to the latest revision (`safetrain migrate`)."""
    command.upgrade(alembic_config(engine), "head")


def downgrade_to_base(engine: Engine | None = None) -> None:
    """Drop every table the migrations made (tests start from nothing)."""
    command.downgrade(alembic_config(engine), "base")
