"""The HTTP app: shared services, middleware, one router per endpoint module.

To add an endpoint (or a protocol: a package like ``anthropic/``), write a module with a ``router(services)`` whose generating routes call
``services.serve(endpoint, body, request)`` (:mod:`glmserve.api.runner`), and list it in
:data:`ROUTERS`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

import glmserve
from glmserve.api import info, inspector, ui
from glmserve.api.anthropic import routes as anthropic_routes
from glmserve.api.openai import chat, completions
from glmserve.api.responses import routes as responses_routes
from glmserve.api.errors import install_handlers
from glmserve.api.middleware import AuthMiddleware, BodyLimitMiddleware, LeaseMiddleware, RequestMetricsMiddleware
from glmserve.api.runner import Services
from glmserve.api.settings import ArgumentHook, Settings, check_api_keys
from glmserve.engine.base import Engine
from glmserve.formats.base import ChatFormat

__all__ = ["ArgumentHook", "ROUTERS", "Settings", "create_app"]

ROUTERS: list[Callable[[Services], APIRouter]] = [chat.router, completions.router, anthropic_routes.router,
                                                   responses_routes.router, info.router, ui.router]
"""Every endpoint module's router factory, in the order their routes are matched."""


def create_app(
    engine: Engine,
    fmt: ChatFormat,
    settings: Settings | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    settings = settings or Settings()
    check_api_keys(settings.api_keys)  # again: a Settings may be changed after it was made
    services = Services.build(engine, fmt, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for start in services.on_start:
            await start()
        try:
            yield
        finally:
            for stop in services.on_stop:
                await stop()
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(title="glmserve", version=glmserve.__version__, lifespan=lifespan)
    app.state.services = services
    app.state.engine, app.state.format = engine, fmt
    app.state.metrics, app.state.admission = services.metrics, services.admission
    app.state.inspector = watch = inspector.Inspector(settings.inspect, settings.inspect_max_bytes) \
        if settings.inspect else None
    install_handlers(app)
    # the last added runs first: counting every answer, then keys, then the body (limit, read
    # timeout); innermost, the owner of the leases routes take, and the inspector when on
    if watch is not None:
        app.add_middleware(inspector.InspectorMiddleware, inspector=watch)
    app.add_middleware(LeaseMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, read_timeout=settings.read_timeout)
    app.add_middleware(AuthMiddleware, keys=settings.api_keys)
    app.add_middleware(RequestMetricsMiddleware, metrics=services.metrics, router=app.router)
    for make_router in ROUTERS:
        app.include_router(make_router(services))
    app.include_router(inspector.router(watch))
    return app
