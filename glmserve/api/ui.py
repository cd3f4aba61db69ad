"""``/ui``: the playground, served by the server itself.

The page is plain HTML, CSS and JavaScript modules shipped inside the package
(``glmserve/ui/``): no CDN, no build step, it works offline.  It speaks the three APIs
(Chat Completions, Messages, Responses) like any client, with the user's API key, and reads
the request inspector (:mod:`glmserve.api.inspector`).  Besides the files, two small routes:

* ``GET /ui/info`` (open, like ``/version``): what the page adapts to -- the chat format, the
  reasoning switches the family has, whether keys are needed, whether the inspector is on;
* ``POST /v1/ui/validate`` (behind the API key): whether a call's arguments fit its tool's
  schema, with the ``jsonschema`` checks the server's own backstop uses.
"""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from typing import Any

import jsonschema
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from referencing.exceptions import Unresolvable
from starlette.responses import RedirectResponse, Response

import glmserve
from glmserve.api.errors import APIError
from glmserve.api.runner import Services
from glmserve.formats.base import ChatFormat, ChatRequest, ReasoningEvent

FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "apis.js": "text/javascript; charset=utf-8", "inspect.js": "text/javascript; charset=utf-8",
         "examples.js": "text/javascript; charset=utf-8", "dom.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
"""The page's files (``glmserve/ui/``) and their types: nothing else is served from there."""

HEADERS = {
    # the page talks to this server only, and runs only its own files
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class ValidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    tool_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    """The tool's parameters schema (None: any JSON object is valid)."""
    arguments: str
    """The call's arguments, as the API returned them (a JSON text)."""


def capabilities(fmt: ChatFormat) -> dict[str, bool]:
    """What the family's reasoning offers, found by asking the format itself: whether it
    reasons at all, whether thinking can be turned off, whether a budget can close it, and
    whether a reasoning effort changes the prompt."""
    probe = ChatRequest(messages=[{"role": "user", "content": "hi"}])
    on = fmt.render(probe).text
    switch = on != fmt.render(replace(probe, enable_thinking=False)).text
    effort = on != fmt.render(replace(probe, reasoning_effort="low")).text
    budget = fmt.reasoning_switch(probe) is not None
    reasoning = switch or budget
    for sample in ("<think>a</think>b", "a</think>b"):
        parser = fmt.parser(probe)
        events = parser.feed(sample) + parser.finish()
        reasoning = reasoning or any(isinstance(e, ReasoningEvent) for e in events)
    return {"reasoning": reasoning, "switch": switch, "budget": budget, "effort": effort}


def argument_problems(validator: Any, arguments: str, limit: int = 5) -> list[str]:
    """Why a call's ``arguments`` are not a JSON object valid against its tool's schema (at most
    ``limit`` reasons; ``validator`` None: any object will do); empty when they are.  Raises
    ``Unresolvable`` for a schema whose ``$ref`` leads nowhere."""
    try:
        args = json.loads(arguments)
    except ValueError as exc:
        return [f"not JSON: {exc}"]
    if not isinstance(args, dict):
        return ["the arguments are not a JSON object"]
    if validator is None:
        return []
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
            for _, e in zip(range(limit), validator.iter_errors(args))]


def check_arguments(schema: dict[str, Any] | None, arguments: str) -> dict[str, Any]:
    """``{"valid": bool, "errors": [...]}``; ``valid`` is None when the schema itself is not one."""
    validator = None
    if schema is not None:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            return {"valid": None, "errors": [f"the tool's schema is not a valid JSON schema: {exc.message}"]}
        validator = cls(schema)
    try:
        errors = argument_problems(validator, arguments, limit=5)
    except Unresolvable as exc:
        return {"valid": None, "errors": [f"the tool's schema cannot be resolved: {exc}"]}
    return {"valid": not errors, "errors": errors}


def router(services: Services) -> APIRouter:
    r = APIRouter()
    files = resources.files(glmserve).joinpath("ui")
    info = {"version": glmserve.__version__, "chat_format": services.fmt.name,
            "thinking": capabilities(services.fmt), "auth": bool(services.settings.api_keys),
            "inspect": services.settings.inspect, "apis": ["chat.completions", "messages", "responses"]}

    @r.get("/ui", include_in_schema=False)
    async def ui_root() -> Response:
        return RedirectResponse("ui/", status_code=308)  # relative: right behind a path prefix too

    @r.get("/ui/", include_in_schema=False)
    async def page() -> Response:
        return _file(files, "index.html")

    @r.get("/ui/info", include_in_schema=False)
    async def ui_info() -> dict[str, Any]:
        return info

    @r.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in FILES:
            raise APIError(404, f"no such file: /ui/{name}", code="not_found")
        return _file(files, name)

    @r.post("/v1/ui/validate", include_in_schema=False)
    async def validate(body: ValidateRequest) -> dict[str, Any]:
        return check_arguments(body.tool_schema, body.arguments)

    return r


def _file(files: Any, name: str) -> Response:
    return Response(files.joinpath(name).read_bytes(), media_type=FILES[name], headers=HEADERS)
