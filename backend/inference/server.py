"""`safetrain serve`: the embedded engine behind OpenAI-shaped HTTP, the same routes vLLM's server answers.

`/v1/chat/completions` and `/v1/completions` (Server-Sent Events with `stream: true`), vLLM's runtime adapter
routes `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (plus safetrain's `base_model`, `quantization` and
`dtype` fields, which vLLM does not need: it serves one base), `/v1/models` and `/health`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from backend.config import Settings, get_settings
from backend.inference.engine import Engine, Sink
from backend.inference.protocol import (
    GenerationRequest,
    call_fields,
    call_finish_reason,
    chunk_object,
    completion_object,
    parse_request,
    usage,
)
from backend.inference.tool_calls import CallStream
from backend.services.base_models import list_base_models
from backend.services.errors import InvalidRequest, NotFound, ServiceError

log = logging.getLogger(__name__)


def error_body(status: int, message: str, *, error_type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    kind = error_type or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(error: Exception) -> JSONResponse:
    if isinstance(error, ServiceError):
        body = error_body(error.status, error.message, error_type=error.error_type, param=error.param, code=error.code)
        return JSONResponse(body, status_code=error.status)
    log.exception("generation failed", exc_info=error)
    return JSONResponse(error_body(500, f"The engine failed: {type(error).__name__}: {error}"), status_code=500)


class Channel(Sink):
    """Events from the engine thread to the request's coroutine: start, delta, finish, error, end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.gone = False

    def _put(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def start(self, prompt_tokens: int) -> None:
        self._put("start", prompt_tokens)

    def delta(self, index: int, text: str) -> None:
        self._put("delta", index, text)

    def finish(self, index: int, reason: str, completion_tokens: int) -> None:
        self._put("finish", index, reason, completion_tokens)

    def fail(self, error: Exception) -> None:
        self._put("error", error)

    def end(self) -> None:
        self._put("end")

    def cancelled(self) -> bool:
        return self.gone


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Answer:
    """One request's events turned into an OpenAI answer: whole, or streamed as chunks."""

    def __init__(self, request: GenerationRequest, channel: Channel, prompt_tokens: int) -> None:
        self.request, self.channel, self.prompt_tokens = request, channel, prompt_tokens
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{secrets.token_urlsafe(18)}"
        self.created = int(time.time())
        self.completion_tokens = 0
        # Where the answer's calls are read, each streamed choice holds back text that may begin a call.
        self._calls = ([CallStream(request.tool_names) for _ in range(request.sampling.n)]
                       if request.calls_tools and request.stream else [])

    async def whole(self) -> Response:
        n = self.request.sampling.n
        texts, reasons = [""] * n, ["length"] * n
        while True:
            event = await self.channel.queue.get()
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
                self.completion_tokens += event[3]
            elif event[0] == "error":
                return _error_response(event[1])
            elif event[0] == "end":
                break
        body = completion_object(self.request, response_id=self.id, texts=texts, finish_reasons=reasons,
                                 used=usage(self.prompt_tokens, self.completion_tokens))
        return JSONResponse(body)

    async def chunks(self) -> AsyncIterator[bytes]:
        started: set[int] = set()
        try:
            while True:
                event = await self.channel.queue.get()
                if event[0] == "end":
                    break
                if event[0] == "error":
                    error = event[1]
                    status = getattr(error, "status", 500)
                    yield _sse(error_body(status, getattr(error, "message", str(error))))
                    return
                index = event[1]
                first = index not in started
                started.add(index)
                if event[0] == "delta":
                    text = self._calls[index].feed(event[2]) if self._calls else event[2]
                    if text or first:
                        yield _sse(self._chunk(index=index, text=text, first=first))
                else:
                    self.completion_tokens += event[3]
                    for chunk in self._closing(index, event[2], first):
                        yield _sse(chunk)
            if self.request.include_usage:
                yield _sse(self._chunk(used=usage(self.prompt_tokens, self.completion_tokens)))
            yield b"data: [DONE]\n\n"
        finally:
            self.channel.gone = True  # the client went away (or the answer is complete): stop generating

    def _closing(self, index: int, reason: str, first: bool) -> list[dict[str, Any]]:
        """A choice's last chunks: the content held back in case it began a call, the calls, the finish reason."""
        if not self._calls:
            return [self._chunk(index=index, finish_reason=reason, first=first)]
        rest, parsed = self._calls[index].finish()
        parts: list[dict[str, Any]] = [{"text": rest}] if rest else []
        if parsed is not None:
            parts.append({"calls": call_fields(self.request, parsed.tool_calls, streamed=True)})
        parts.append({"finish_reason": call_finish_reason(self.request, reason, parsed)})
        return [self._chunk(index=index, first=first and n == 0, **part) for n, part in enumerate(parts)]

    def _chunk(self, **parts: Any) -> dict[str, Any]:
        return chunk_object(self.request, response_id=self.id, created=self.created, **parts)


def create_engine_app(settings: Settings | None = None, *, device: str = "cpu") -> FastAPI:
    """The engine's HTTP app; the models load on first use."""
    import peft  # noqa: F401 - imported now (seconds), not inside the first adapter request

    settings = settings or get_settings()
    engine = Engine(settings, device=device)
    app = FastAPI(title="safetrain inference engine", version="0.1.0")
    app.state.engine = engine

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "device": device, "waiting": engine.waiting,
                "loaded_adapters": engine.loaded_adapters()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "safetrain", "parent": None}
                for name, created in list_base_models(settings=settings)]
        data += [{"id": spec.name, "object": "model", "created": 0, "owned_by": "safetrain",
                  "parent": spec.base_model, "root": str(spec.path)} for spec in engine.adapters.values()]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        spec = Engine.spec_from_request(await _json(request))
        engine.register(spec)
        return PlainTextResponse(f"Success: LoRA adapter '{spec.name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        name = (await _json(request)).get("lora_name")
        if not isinstance(name, str) or not engine.unregister(name):
            raise NotFound(f"The LoRA adapter {name!r:.200} is not loaded.", param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(engine, await _json(request), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(engine, await _json(request), "completion")

    return app


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return body


async def _generate(engine: Engine, body: dict[str, Any], kind: Any) -> Response:
    request = parse_request(body, kind=kind, limits=engine.limits)
    engine.admit()
    channel = Channel(asyncio.get_running_loop())

    def work() -> None:
        try:
            if not channel.gone:
                engine.generate(request, channel)
        except Exception as error:  # reported to the client: a 4xx before the first token, an error event after
            channel.fail(error)
        finally:
            engine.leave()
            channel.end()

    try:
        engine.executor.submit(work)
    except RuntimeError:
        engine.leave()
        raise
    try:
        first = await channel.queue.get()
    except asyncio.CancelledError:
        channel.gone = True  # the client left while queued: the engine skips it
        raise
    if first[0] == "error":
        return _error_response(first[1])
    if first[0] != "start":
        return _error_response(RuntimeError("the engine ended the request before it started"))
    answer = Answer(request, channel, first[1])
    if not request.stream:
        return await answer.whole()
    return StreamingResponse(answer.chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def serve(host: str = "127.0.0.1", port: int | None = None, device: str | None = None) -> None:
    """Run the engine under uvicorn (`safetrain serve`)."""
    import uvicorn

    from backend.inference.devices import pick_device

    settings = get_settings()
    chosen = pick_device(device or settings.inference_device)
    app = create_engine_app(settings, device=chosen)
    print(f"safetrain inference engine on http://{host}:{port or settings.inference_port} ({chosen})", flush=True)
    uvicorn.run(app, host=host, port=port or settings.inference_port, log_level="warning")
