"""Errors the services raise; the API turns each into the OpenAI error envelope with its status."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal the client can act on; `status` is the HTTP status the API answers with."""

    status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ServiceError):
    """Bad input or a state conflict (400)."""


class NotFound(ServiceError):
    """No such object in this project (404): other projects' objects are reported the same way."""

    status = 404

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "not_found") -> None:
        super().__init__(message, param=param, code=code)


class TooLarge(ServiceError):
    """An upload over the size limit (413)."""

    status = 413

    def __init__(self, message: str, *, param: str | None = "file", code: str | None = "file_too_large") -> None:
        super().__init__(message, param=param, code=code)


class QuotaExceeded(ServiceError):
    """A project quota would be passed (429)."""

    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "quota_exceeded") -> None:
        super().__init__(message, param=param, code=code)
