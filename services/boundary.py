"""What may enter through the API or an import file, checked once at the edge.

The rule: text that a store cannot keep exactly is refused, never altered. PostgreSQL's text
and JSONB cannot hold NUL (U+0000), no UTF-8 store can hold a lone surrogate (U+D800..DFFF
unpaired, which JSON's \\ud800 escape can produce), and JSON has no NaN or Infinity (Python's
json reads them, and a number like 1e400 becomes Infinity). Stripping or replacing would store
something other than what the client sent, so each is a 422 naming where it was found, in
every string of a body (keys included), in the path and in the query. Bodies larger than
`max_body_bytes` are a 413 before they are read further.

`strict_loads` is the one parser of both doors: the HTTP middleware below and the JSONL import
(services/conversations/jsonl.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from services.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class UnsafeInput(ValueError):
    """Input a store could not keep exactly; `where` is its dotted location."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored exactly, or None."""
    if "\x00" in value:
        return "NUL characters (\\u0000) are not accepted"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "unpaired surrogate code points (\\ud800-\\udfff) are not valid text"
    return None


def check_text(value: str, where: str) -> None:
    problem = text_problem(value)
    if problem is not None:
        raise UnsafeInput(where, problem)


def check_value(value: Any, where: str = "") -> None:
    """Every string (keys included) and number of a parsed JSON value, recursively."""
    if isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UnsafeInput(
                where, "not a finite number (JSON has no NaN or Infinity, nor numbers beyond 1e308)"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"{where}.{key}" if where else str(key))
            check_value(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_value(item, f"{where}.{index}" if where else str(index))


def strict_loads(raw: str | bytes) -> Any:
    """json.loads, refusing NaN, Infinity, numbers that overflow to them and unstorable
    strings (UnsafeInput names where); malformed JSON raises json.JSONDecodeError."""
    value = json.loads(raw)  # NaN, Infinity and 1e400 parse to non-finite floats: checked below
    check_value(value)
    return value


class RequestBoundary:
    """ASGI middleware: the size limit and `strict_loads` on every JSON body, and no NUL or
    lone surrogate in the path or query, before routing. Malformed JSON is left to FastAPI's
    own 422."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            check_text(scope.get("path", ""), "path")
            query = scope.get("query_string", b"").decode("latin-1")
            for key, value in parse_qsl(query, keep_blank_values=True):
                check_text(key, f"query.{key}")
                check_text(value, f"query.{key}")
        except UnsafeInput as exc:
            await _answer(send, 422, "invalid_request", str(exc), exc.where)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _too_large(send, self.max_body_bytes)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _too_large(send, self.max_body_bytes)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        if body and b"json" in headers.get(b"content-type", b"json"):
            try:
                strict_loads(body)
            except UnsafeInput as exc:
                param = exc.where or None
                await _answer(
                    send, 422, "invalid_request", f"body.{exc}" if exc.where else str(exc), param
                )
                return
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # FastAPI reports malformed JSON itself
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    await _answer(
        send,
        413,
        "payload_too_large",
        f"the request body exceeds {limit} bytes (OUTCOMELOOP_MAX_BODY_BYTES)",
        None,
    )


async def _answer(send: Send, status: int, code: str, message: str, param: str | None) -> None:
    payload = json.dumps(error_body(code, message, param)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
