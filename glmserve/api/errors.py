"""Errors, and the shape each endpoint answers them in.

The shape is chosen by the request path: a registry of path prefixes -> :class:`ErrorShape`
(the longest matching prefix wins).  The default is OpenAI's
``{"error": {"message", "type", "param", "code"}}``; an endpoint with its own shape (the
Anthropic Messages API's ``{"type": "error", "error": {...}}``) registers its prefix once, and
its 400s, 401s, 413s, 429s, validation errors and in-band stream errors all take that shape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from glmserve.engine.base import EngineRequestError, EngineUnavailable

log = logging.getLogger("glmserve.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",  # OpenAI answers an unknown model so (code model_not_found)
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def openai_stream_error(status: int, message: str, param: str | None = None, code: str | None = None) -> str:
    """An error inside an OpenAI server-sent-event stream (the headers are gone), ending it."""
    return "data: " + json.dumps(error_body(status, message, param, code)) + "\n\ndata: [DONE]\n\n"


ErrorBodyBuilder = Callable[[int, str, "str | None", "str | None"], dict[str, Any]]
"""``builder(status, message, param, code) -> JSON body``."""


@dataclass(frozen=True)
class ErrorShape:
    """How one API surface writes its errors: the body builder, and the JSON schema the
    OpenAPI document shows for it (under ``components/schemas/<schema_name>``)."""

    body: ErrorBodyBuilder
    schema: dict[str, Any]
    schema_name: str


_SHAPES: dict[str, ErrorShape] = {}


def register_error_shape(prefix: str, shape: ErrorShape) -> None:
    """Answer errors of every path starting with ``prefix`` in ``shape``."""
    _SHAPES[prefix] = shape


def error_shape(path: str) -> ErrorShape:
    """The shape for a request path: the longest registered prefix, else OpenAI's."""
    best = max((p for p in _SHAPES if path.startswith(p)), key=len, default=None)
    return OPENAI_ERRORS if best is None else _SHAPES[best]


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, *, path: str = "") -> JSONResponse:
    """The error in the shape of the endpoint at ``path``."""
    return JSONResponse(error_shape(path).body(status, message, param, code), status_code=status, headers=headers)


_LABELS = ("function-", "union[", "tagged-union[", "list[", "str", "dict[", "literal[", "int", "float", "bool",
           "constrained-", "nullable[")
_NO_BODY = object()


def _label(item: Any) -> bool:
    """A union branch's name in an error location (``str``, ``list[...]``...), not a field."""
    return isinstance(item, str) and (item.startswith(_LABELS) or "[" in item)


def _loc_to_param(loc: tuple[Any, ...], body: Any = _NO_BODY) -> str:
    """The request field an error location names, as ``a.b[0].c``.  With the request ``body``
    the location is walked through it, so the labels pydantic puts in it for union branches
    (``str``, ``list[...]``, a tagged union's tag such as ``image`` or ``base64``) are told
    from fields for sure: a step that is not a key or index of the data there is a label."""
    parts: list[str] = []
    node = body if isinstance(body, (dict, list)) else _NO_BODY
    for n, item in enumerate(loc):
        if n == 0 and item == "body":
            continue
        if node is not _NO_BODY:
            if isinstance(item, int) and isinstance(node, list) and 0 <= item < len(node):
                node = node[item]
            elif isinstance(item, str) and isinstance(node, dict) and item in node:
                node = node[item]
            elif n == len(loc) - 1 and isinstance(item, str) and not _label(item):
                pass  # a missing field: named, though not in the data
            else:
                continue  # a union branch's label
        elif item == "body" or _label(item):
            continue
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
    return "".join(parts) or "body"


def validation_message(exc: ValidationError | RequestValidationError, body: Any = _NO_BODY,
                       prefix: str = "") -> tuple[str, str]:
    """``(message, param)`` for the most specific of the errors: the one located deepest, which
    for a union (``content``: a string or a list of blocks) is the branch the input got
    furthest into, not the first branch tried.  ``body``: the data validated (FastAPI's
    ``RequestValidationError`` carries it); ``prefix``: where that data sits in the request."""
    errors = exc.errors()
    if not errors:
        return "invalid request", prefix or "body"
    if body is _NO_BODY:
        body = getattr(exc, "body", _NO_BODY)
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _loc_to_param(tuple(first.get("loc", ())), body)
    msg = first.get("msg", "invalid value")
    kind = first.get("type")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", "body"
    if kind == "invalid_unicode":  # raised before field validation; the path is in the context
        param = str(first.get("ctx", {}).get("param", param))
    elif param == "body" and not prefix and kind in ("model_attributes_type", "model_type", "dict_type", "missing"):
        return "the request body must be a JSON object (sent with Content-Type: application/json)", "body"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):  # the tag names the field
        param = (f"{param}." if param != "body" else "") + str(first.get("ctx", {}).get("discriminator", "type")).strip("'")
    if prefix:
        param = prefix if param == "body" else prefix + ("" if param.startswith("[") else ".") + param
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return f"{param}: {msg}", param


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

OPENAI_ERRORS = ErrorShape(error_body, ERROR_SCHEMA, "ErrorResponse")

_ERRORS = {
    "400": "invalid request (the message and param name the problem)",
    "401": "missing or invalid API key",
    "404": "no such model (model_not_found) or stored object",
    "408": "the request's headers or body did not arrive within --read-timeout",
    "413": "request body larger than --max-body-bytes",
    "429": "too many requests in flight; retry after Retry-After seconds",
    "500": "internal error",
    "503": "the engine (or, under /v1/responses, the response store) is unavailable",
    "507": "the response was not stored: it does not fit the API key's share of the store (store_full)",
}


def _error_codes(path: str, op: dict[str, Any]) -> list[str]:
    codes = ["500"]
    if "requestBody" in op or op.get("parameters"):
        codes.append("400")
    if "requestBody" in op:
        codes += ["408", "413"]
    if path.startswith("/v1"):
        codes.append("401")
    # a path naming an object (a stored response) that may not exist, or a body naming a model
    if "{" in path or ("requestBody" in op and (path.startswith("/v1") or path == "/tokenize")):
        codes.append("404")
    if path.startswith("/v1") and "requestBody" in op:  # generating routes: admission and the engine
        codes += ["429", "503"]
    if path == "/health" or path.startswith("/v1/responses"):  # the engine; the response store
        codes.append("503")
    if path == "/v1/responses" and "requestBody" in op:  # a response its key's share cannot hold
        codes.append("507")
    return sorted(set(codes))


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the server really answers: OpenAI-shaped
    errors (400 for validation, never FastAPI's 422) with the codes each route can give."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = original()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            for path, ops in doc.get("paths", {}).items():
                shape = error_shape(path)
                schemas[shape.schema_name] = shape.schema
                body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape.schema_name}"}}}
                for op in ops.values():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)
                    for code in _error_codes(path, op):
                        responses.setdefault(code, {"description": _ERRORS[code], "content": body})
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def install_handlers(app: FastAPI) -> None:
    document_errors(app)

    @app.exception_handler(APIError)
    async def _api_error(r: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers, path=r.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(r: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(exc)
        return error_response(400, msg, param, path=r.url.path)

    @app.exception_handler(ValidationError)
    async def _pyd_validation(r: Request, exc: ValidationError) -> JSONResponse:
        msg, param = validation_message(exc)
        return error_response(400, msg, param, path=r.url.path)

    @app.exception_handler(json.JSONDecodeError)
    async def _json(r: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, f"request body is not valid JSON: {exc}", "body", path=r.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None), path=r.url.path)

    @app.exception_handler(EngineUnavailable)
    async def _dead(r: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_response(503, f"the engine is unavailable: {exc}", code="engine_unavailable", path=r.url.path)

    @app.exception_handler(EngineRequestError)
    async def _rejected(r: Request, exc: EngineRequestError) -> JSONResponse:
        return error_response(400, str(exc), exc.param, path=r.url.path)

    @app.exception_handler(RecursionError)
    async def _too_deep(r: Request, exc: RecursionError) -> JSONResponse:
        # Only input nested beyond reason gets here (schemas, extra fields): a client error.
        return error_response(400, "the request is nested too deeply", "body", path=r.url.path)

    @app.exception_handler(Exception)
    async def _internal(r: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}", code="server_error", path=r.url.path)
