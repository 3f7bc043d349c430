"""Liveness and readiness: /healthz answers while the process runs; /readyz checks the database and the broker."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from backend.api.errors import error_response
from backend.api.schemas import error_responses

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_SECONDS = 2


def check_database(request: Request) -> None:
    """Raise unless `SELECT 1` answers."""
    with request.app.state.session_factory() as session:
        session.execute(text("SELECT 1"))


def check_broker(url: str) -> None:
    """Raise unless the Celery broker accepts a connection."""
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(
            url, socket_connect_timeout=CHECK_TIMEOUT_SECONDS, socket_timeout=CHECK_TIMEOUT_SECONDS
        )
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=CHECK_TIMEOUT_SECONDS) as connection:
        connection.ensure_connection(max_retries=1)


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker reachable", responses=error_responses(503))
async def readyz(request: Request) -> Any:
    """200 when the database and the broker answer; 503 in the error envelope naming what failed."""
    checks: dict[str, str] = {}
    for name, check in (
        ("database", lambda: check_database(request)),
        ("broker", lambda: check_broker(request.app.state.settings.broker_url)),
    ):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    failed = [name for name, state in checks.items() if state != "ok"]
    if failed:
        return error_response(503, f"Not ready: {', '.join(failed)} unavailable.", code="not_ready")
    return JSONResponse({"status": "ok", "checks": checks})
