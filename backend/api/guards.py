"""Request hygiene before routing: NUL characters in the path or query, and oversized bodies, are refused outright.

PostgreSQL cannot store or compare text holding NUL, and no id, cursor or filter legitimately carries one, so
such a request is a 400 here rather than a database error (a 500) wherever the value would have been used.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.api.errors import error_response


class RefuseNulMiddleware:
    """Answer 400 in the error envelope when the path or query string holds a NUL (raw or %00)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query: bytes = scope.get("query_string", b"")
            if "\x00" in scope.get("path", "") or b"\x00" in query or b"%00" in query:
                response = error_response(400, "The request's path or query holds a NUL character.",
                                          code="invalid_value")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


MAX_JSON_BODY_BYTES = 1024**2


class LimitBodyMiddleware:
    """413 for a request body over `max_bytes`, counted as it arrives: JSON bodies are read whole into memory.

    Uploads (`POST /v1/files`) are exempt: their route streams to disk and enforces the upload limit itself.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) == ("POST", "/v1/files"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI re-raises HTTPException from body reading; the error handler shapes the envelope.
                raise HTTPException(413, f"The request body is larger than {self.max_bytes} bytes.")
            return message

        await self.app(scope, counted, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"The request body is larger than {self.max_bytes} bytes.",
                                  code="request_too_large")
        await response(scope, receive, send)
