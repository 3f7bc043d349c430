"""The API's side of serving: OpenAI-shaped HTTP to an engine (the embedded one or vLLM), streaming through.

Adapters are registered with the engine through vLLM's runtime route `/v1/load_lora_adapter` before their first
request, and again when the engine answers 404 for one (it restarted and forgot). An engine that cannot be
reached is EngineUnavailable (503); an engine that goes away mid-stream ends the stream with an error event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from backend.inference.served_models import ServedModel
from backend.services.errors import ServiceError

log = logging.getLogger(__name__)

_DONE = b"data: [DONE]"

class EngineUnavailable(ServiceError):
    """The inference engine cannot be reached (503); the next request tries again."""

    status = 503
    error_type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_unavailable")

@dataclass
class Observed:
    """What one answer measured, for /metrics: when its first token came and how many tokens it made."""

    started: float = field(default_factory=time.perf_counter)
    first_token_seconds: float | None = None
    completion_tokens: int = 0
    status: int = 0

@dataclass
class EngineAnswer:
    """The engine's answer: status and body, or (`chunks` set) a stream of Server-Sent Events to pass on."""

    status: int
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None

def _unavailable(error: Exception) -> EngineUnavailable:
    return EngineUnavailable(f"The inference engine is unavailable ({type(error).__name__}); try again shortly.")

def _error_event(message: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "engine_unavailable"}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"

class InferenceClient:
    """One connection pool to one engine, and the adapters registered with it by this process."""

    def __init__(self, base_url: str, *, timeout: float) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self.registered: set[str] = set()

    async def close(self) -> None:
        await self.http.aclose()

    async def register(self, model: ServedModel) -> None:
        """Load the adapter into the engine (vLLM answers 400 when it already holds it: that is fine)."""
        adapter = model.adapter
        assert adapter is not None
        body = {"lora_name": model.name, "lora_path": str(adapter.path), "base_model": adapter.base_model,
                "quantization": adapter.quantization, "dtype": adapter.dtype}
        try:
            answer = await self.http.post("/v1/load_lora_adapter", json=body)
        except httpx.TransportError as error:
            raise _unavailable(error) from None
        if answer.status_code >= 400 and "already" not in answer.text:
            log.error("the engine refused adapter %s: %s %s", model.name, answer.status_code, answer.text[:500])
            raise EngineUnavailable(f"The inference engine could not load {model.name}: {answer.text[:300]}")
        self.registered.add(model.name)

    async def unload(self, name: str) -> None:
        """Unload an adapter whose job or file was deleted (best effort: an engine that is down forgot it anyway)."""
        self.registered.discard(name)
        try:
            await self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.TransportError:
            log.info("could not unload %s: the engine is unreachable", name)

    async def generate(self, path: str, model: ServedModel, body: dict[str, Any], observed: Observed) -> EngineAnswer:
        """Send one request; an adapter is registered first (and once more if the engine forgot it)."""
        if model.adapter is not None and model.name not in self.registered:
            await self.register(model)
        answer = await self._send(path, body)
        if answer.status_code == 404 and model.adapter is not None:
            await answer.aclose()
            self.registered.discard(model.name)
            await self.register(model)
            answer = await self._send(path, body)
        observed.status = answer.status_code
        if answer.status_code != 200 or not body.get("stream"):
            content = await self._read(answer)
            if answer.status_code == 200:
                observed.first_token_seconds = time.perf_counter() - observed.started
                observed.completion_tokens = _completion_tokens(content)
            return EngineAnswer(status=answer.status_code, body=content)
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return EngineAnswer(status=200, chunks=self._relay(answer, observed, wants_usage))

    async def _send(self, path: str, body: dict[str, Any]) -> httpx.Response:
        stream = bool(body.get("stream"))
        if stream:  # the usage chunk counts the tokens for /metrics; dropped again unless the client asked
            body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        try:
            return await self.http.send(self.http.build_request("POST", path, json=body), stream=True)
        except httpx.TransportError as error:
            raise _unavailable(error) from None

    async def _read(self, answer: httpx.Response) -> bytes:
        try:
            return await answer.aread()
        except httpx.TransportError as error:
            raise _unavailable(error) from None
        finally:
            await answer.aclose()

    async def _relay(self, answer: httpx.Response, observed: Observed, wants_usage: bool) -> AsyncIterator[bytes]:
        """Pass the engine's events on as they come; the usage chunk is read (and kept only if asked for)."""
        buffer = b""
        try:
            async for piece in answer.aiter_raw():
                buffer += piece
                *events, buffer = buffer.split(b"\n\n")
                out = [event + b"\n\n" for event in events if self._keep(event, observed, wants_usage)]
                if out:
                    yield b"".join(out)
            if buffer.strip():
                yield buffer
        except httpx.TransportError as error:
            log.warning("the engine went away mid-stream: %s", error)
            yield _error_event("The inference engine stopped in the middle of this answer; send the request again.")
        finally:
            await answer.aclose()

    @staticmethod
    def _keep(event: bytes, observed: Observed, wants_usage: bool) -> bool:
        if observed.first_token_seconds is None and event.startswith(b"data: {") and b'"choices":[{' in event:
            observed.first_token_seconds = time.perf_counter() - observed.started
        if event.startswith(_DONE) or b'"usage":{' not in event:
            return True
        observed.completion_tokens = _completion_tokens(event.removeprefix(b"data: "))
        return wants_usage or b'"choices":[]' not in event

def _completion_tokens(content: bytes) -> int:
    try:
        used = json.loads(content).get("usage") or {}
    except (ValueError, AttributeError):
        return 0
    return int(used.get("completion_tokens") or 0)
