"""Alembic environment: runs online against the engine given in the config, or the process's engine."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from backend.db.models import Base


def _engine() -> Engine:
    engine = context.config.attributes.get("engine")
    if engine is not None:
        return engine
    from backend.db.session import get_engine

    return get_engine()


def run_migrations_online() -> None:
    """Run the migrations in one transaction on the target engine."""
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            compare_type=True,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
