"""The error body every endpoint answers with, as OpenAPI documents it (services/errors.py
makes it; services/app.py maps each error to it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable name: invalid_request, not_found, ...")
    message: str = Field(description="What went wrong, for a person.")
    param: str | None = Field(
        default=None, description="The request field at fault, dotted (body, path or query)."
    )
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="On a 422 from validation: every problem (loc, msg, type)."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _response(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _response("Bad request."),
    401: _response("Missing, unknown or revoked API key."),
    403: _response("The key may not do this (a business key on an operator endpoint)."),
    404: _response("Not found, or not this business's."),
    409: _response("Clashes with what is stored (a replay with other content, a state)."),
    413: _response("The request body is larger than OUTCOMELOOP_MAX_BODY_BYTES."),
    422: _response(
        "Invalid: a value of the wrong type or out of range, or text a store cannot keep "
        "exactly (NUL, an unpaired surrogate, NaN or Infinity)."
    ),
    503: _response("A dependency is down (database, generation backend, step queue)."),
}
