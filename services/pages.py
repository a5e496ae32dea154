"""The shape of every operator list: `{"object": "list", "data": [...], "has_more": bool}`,
newest first, paged with `after` (the last id of the previous page) and `limit`."""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel

from services.errors import Invalid

T = TypeVar("T")

AfterQuery = Annotated[
    str | None, Query(max_length=64, description="The last id of the previous page.")
]
LimitQuery = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
# Integer cursors (audit ids, event seqs) are 32-bit in the store: a larger one is a 422, not
# a database error.
MAX_INT_CURSOR = 2**31 - 1


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


def unknown_cursor(what: str, after: str) -> Invalid:
    return Invalid(f"after: no {what} {after!r}")
