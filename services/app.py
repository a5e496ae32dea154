"""The FastAPI application: built once per process by `create_app`."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import metrics
from services import models as _all_tables  # noqa: F401  (every table known to the ORM)
from services.audit.endpoints import router as audit_router
from services.boundary import RequestBoundary
from services.conversations.endpoints import router as conversations_router
from services.db import make_engine, make_session_factory
from services.error_schemas import ERROR_RESPONSES
from services.errors import (
    HTTP_CODES,
    DomainError,
    Unauthenticated,
    describe_validation_error,
    error_body,
    validation_param,
)
from services.experiments.endpoints import router as experiments_router
from services.generation.base import GenerationBackend
from services.generation.factory import BackendHolder, ModelNotPrepared
from services.iterations.endpoints import router as iterations_router
from services.iterations.runner import CeleryRunner, StepRunner
from services.policies.endpoints import router as policies_router
from services.settings import Settings, get_settings
from services.suggestions.endpoints import router as suggestions_router
from services.tenants.endpoints import keys_router
from services.tenants.endpoints import router as businesses_router

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    backend: GenerationBackend | None = None,
    runner: StepRunner | None = None,
) -> FastAPI:
    """Build the app; `backend` overrides the configured generation backend (tests).

    `runner` is where iteration steps run. Unset: Celery when `settings.runner` is celery;
    otherwise none, and the iteration endpoints that start a step answer 503 (`outcomeloop
    serve` hands in the in-process runner: the API itself never imports the workers).
    """
    settings = settings or get_settings()
    if runner is None and settings.runner == "celery":
        runner = CeleryRunner(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.is_embedded:
            # The embedded default migrates its own SQLite file; Postgres deployments run
            # `outcomeloop db upgrade` as a release step instead.
            from services.migrate import upgrade

            upgrade(settings.sqlalchemy_url)
        engine = make_engine(
            settings.sqlalchemy_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        metrics.PIPELINE.sessions = app.state.session_factory
        app.state.settings = settings
        app.state.backends = BackendHolder(settings, backend)
        if backend is None:
            try:
                app.state.backends.get()
            except ModelNotPrepared as exc:
                log.warning("suggestions unavailable until the model is prepared: %s", exc.detail)
        try:
            yield
        finally:
            app.state.backends.close()
            engine.dispose()

    app = FastAPI(
        title="outcomeloop",
        version="0.1.0",
        description="Suggested responses that drive conversation outcomes.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.runner = runner

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code, content=error_body(exc.code, exc.message, exc.param)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        problems = [describe_validation_error(e) for e in errors]
        param = validation_param(errors[0]) if errors else None
        body = error_body("invalid_request", "; ".join(problems), param)
        body["error"]["errors"] = jsonable_errors(exc)
        return JSONResponse(status_code=422, content=body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "error")
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body(code, str(exc.detail)),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return JSONResponse(
            status_code=503,
            content=error_body("database_unavailable", "the database is unavailable; retry later"),
        )

    @app.middleware("http")
    async def _observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500  # an exception no handler answered reaches the client as a 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            metrics.HTTP_LATENCY.labels(template, request.method).observe(elapsed)
            metrics.HTTP_REQUESTS.labels(template, request.method, f"{status // 100}xx").inc()

    @app.get("/healthz", tags=["ops"])
    def healthz(request: Request) -> dict[str, str]:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return {"status": "ok", "database": request.app.state.engine.dialect.name}

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    def prometheus_metrics(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> PlainTextResponse:
        """Prometheus exposition. It shows counts across tenants: with OUTCOMELOOP_METRICS_TOKEN
        set, only `Authorization: Bearer <token>` may read it."""
        token = request.app.state.settings.metrics_token
        if token and not hmac.compare_digest(authorization or "", f"Bearer {token}"):
            raise Unauthenticated(
                "metrics need 'Authorization: Bearer <OUTCOMELOOP_METRICS_TOKEN>'"
            )
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # Outermost: nothing a store cannot keep exactly, and no oversized body, reaches a route.
    app.add_middleware(RequestBoundary, max_body_bytes=settings.max_body_bytes)
    app.include_router(conversations_router)
    app.include_router(suggestions_router)
    app.include_router(businesses_router)
    app.include_router(keys_router)
    app.include_router(policies_router)
    app.include_router(experiments_router)
    app.include_router(iterations_router)
    app.include_router(audit_router)
    return app


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
        for e in exc.errors()
    ]
