"""/v1/chat/completions and /v1/completions: checked, resolved within the project, proxied to the engine.

The API never loads a model: it checks the request (400 naming `param`), finds the model among the base models
and the project's fine-tuned models and checkpoints (404 otherwise), and streams the engine's answer through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from backend.api.deps import BEARER, SettingsDep, authenticate
from backend.api.metrics import Metrics
from backend.api.schemas import error_responses
from backend.config import Settings
from backend.inference.client import InferenceClient, Observed
from backend.inference.protocol import Limits, RequestKind, parse_request
from backend.inference.served_models import ServedModel, forget_unpacked, resolve_served_model, still_served
from backend.services.errors import InvalidRequest, NotFound, ServiceError

log = logging.getLogger(__name__)

SWEEP_SECONDS = 30.0  # how often adapters whose job or file was deleted are unloaded from the engine


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    sweeper = asyncio.create_task(_sweep_deleted(app))
    try:
        yield
    finally:
        sweeper.cancel()
        client = getattr(app.state, "inference", None)
        if client is not None:
            await client.close()


router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[BEARER], lifespan=_lifespan,
                   responses=error_responses(400, 401, 404, 429, 503))


# The key and the model are checked in one thread-pool hop (not a ProjectDep and then a lookup): the time to the
# first token is what a chat user waits for, and each hop costs a few milliseconds on a busy machine.


@router.post("/chat/completions", summary="Create a chat completion")
async def chat_completions(request: Request, settings: SettingsDep) -> Response:
    """OpenAI's ChatCompletion (`stream: true`: chunks ending `data: [DONE]`) from a base or fine-tuned model."""
    return await _proxy(request, settings, kind="chat", path="/v1/chat/completions")


@router.post("/completions", summary="Create a completion")
async def completions(request: Request, settings: SettingsDep) -> Response:
    """OpenAI's legacy Completion from a base or fine-tuned model."""
    return await _proxy(request, settings, kind="completion", path="/v1/completions")


def inference_client(app: Any) -> InferenceClient:
    """The app's one client of the engine (made on first use)."""
    client: InferenceClient | None = getattr(app.state, "inference", None)
    if client is None:
        settings: Settings = app.state.settings
        client = app.state.inference = InferenceClient(settings.resolved_inference_url,
                                                       timeout=settings.inference_timeout_seconds)
    return client


async def _proxy(request: Request, settings: Settings, *, kind: RequestKind, path: str) -> Response:
    raw = await request.body()
    client = inference_client(request.app)
    body, model = await _checked(client, request, settings, raw, kind)
    metrics: Metrics = request.app.state.metrics
    observed = Observed()
    try:
        answer = await client.generate(path, model, body, observed)
    except ServiceError as error:
        metrics.inference_requests.labels(path, str(error.status)).inc()
        raise
    if answer.chunks is None:
        _record(metrics, path, observed)
        return Response(answer.body, status_code=answer.status, media_type="application/json")
    return StreamingResponse(_counted(answer.chunks, metrics, path, observed), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _checked(client: InferenceClient, request: Request, settings: Settings, raw: bytes,
                   kind: RequestKind) -> tuple[dict[str, Any], ServedModel]:
    """The key (401), the body (400 naming `param`), then the model within the project (404): one thread hop."""
    limits = Limits(settings.inference_max_tokens, settings.inference_max_n)
    name: list[str] = []

    def check() -> tuple[dict[str, Any], ServedModel]:
        with request.app.state.session_factory() as session:
            project = authenticate(request, session)
            try:
                body = json.loads(raw)
            except ValueError:
                raise InvalidRequest("The body is not valid JSON.", code="invalid_value") from None
            checked = parse_request(body, kind=kind, limits=limits)
            name.append(checked.model)
            return body, resolve_served_model(session=session, settings=settings, project=project, name=checked.model)

    try:
        return await run_in_threadpool(check)
    except NotFound:
        if name and name[0] in client.registered:  # its job or result file was deleted since it was served
            await client.unload(name[0])
            forget_unpacked(settings, name[0])
        raise


async def _counted(chunks: AsyncIterator[bytes], metrics: Metrics, path: str,
                   observed: Observed) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        _record(metrics, path, observed)


def _record(metrics: Metrics, path: str, observed: Observed) -> None:
    metrics.inference_requests.labels(path, str(observed.status)).inc()
    if observed.first_token_seconds is not None:
        metrics.inference_first_token.observe(observed.first_token_seconds)
    metrics.inference_tokens.inc(observed.completion_tokens)


async def _sweep_deleted(app: FastAPI) -> None:
    """Every SWEEP_SECONDS, unload from the engine the adapters this process registered whose model is gone."""
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        client: InferenceClient | None = getattr(app.state, "inference", None)
        if client is None or not client.registered:
            continue
        try:
            gone = await run_in_threadpool(_gone, app, sorted(client.registered))
        except Exception:
            log.exception("could not check the served adapters")
            continue
        for name in gone:
            await client.unload(name)
            forget_unpacked(app.state.settings, name)


def _gone(app: FastAPI, names: list[str]) -> list[str]:
    with app.state.session_factory() as session:
        return [name for name in names if not still_served(session=session, settings=app.state.settings, name=name)]
