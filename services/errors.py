"""Domain errors: raised by services, mapped to HTTP by the app and to exit codes by the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class DomainError(Exception):
    """Base class; `status_code` is the HTTP status the API answers with, `code` the stable
    machine-readable name in its body, `param` the request field at fault (if one is)."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotFound(DomainError):
    status_code = 404
    code = "not_found"


class Conflict(DomainError):
    """The request is well formed but clashes with what is stored."""

    status_code = 409
    code = "conflict"


class Invalid(DomainError):
    status_code = 422
    code = "invalid_request"


class Unavailable(DomainError):
    """What the request needs is not running or not configured in this process."""

    status_code = 503
    code = "unavailable"


class Unauthenticated(DomainError):
    status_code = 401
    code = "unauthenticated"


class Forbidden(DomainError):
    status_code = 403
    code = "forbidden"


HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """Every error the API answers: `{"error": {"code", "message", "param"}}`."""
    return {"error": {"code": code, "message": message, "param": param}}


def validation_param(error: Mapping[str, Any]) -> str | None:
    """The field a pydantic error is about, dotted (`hyperparameters.beta`), or None."""
    parts = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    return ".".join(parts) or None


def describe_validation_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as `field.path: message` (the request body's own prefix dropped)."""
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    if error.get("type") == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}"
    return f"{location or 'body'}: {error.get('msg')}"
