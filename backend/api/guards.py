"""Request hygiene before routing: text with NUL characters in the path or query is refused outright.

PostgreSQL cannot store or compare text holding NUL, and no id, cursor or filter legitimately carries one, so
such a request is a 400 here rather than a database error (a 500) wherever the value would have been used.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

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
