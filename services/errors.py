"""Domain errors: raised by services, mapped to HTTP by the app and to exit codes by the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class DomainError(Exception):
    """Base class; `status_code` is the HTTP status the API answers with."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    """The request is well formed but clashes with what is stored."""

    status_code = 409


class Invalid(DomainError):
    status_code = 422


class Unavailable(DomainError):
    """What the request needs is not running or not configured in this process."""

    status_code = 503


class Unauthenticated(DomainError):
    status_code = 401


class Forbidden(DomainError):
    status_code = 403


def describe_validation_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as `field.path: message` (the request body's own prefix dropped)."""
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    if error.get("type") == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}"
    return f"{location or 'body'}: {error.get('msg')}"
