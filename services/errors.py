"""Domain errors: raised by services, mapped to HTTP by the app and to exit codes by the CLI."""

from __future__ import annotations


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


class Unauthenticated(DomainError):
    status_code = 401


class Forbidden(DomainError):
    status_code = 403
