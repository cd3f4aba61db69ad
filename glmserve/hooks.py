"""Optional argument hooks for ``glmserve serve --argument-hook MODULE:FUNCTION``.

A hook is a plain function ``hook(tool_name: str, arguments_json: str) -> str``.  The
server calls it once for every *finished* tool call (a call cut off by ``max_tokens`` is
never passed to it) with the call's arguments exactly as the model wrote them, and sends
what it returns as the call's ``arguments``.  With a hook installed, streamed calls get
their arguments in one piece when the call ends (the hook may rewrite them), instead of
fragment by fragment.

There is no hook by default, and glmserve then never alters arguments: they are the
model's own JSON text, byte for byte (Chinese stays Chinese, spacing is the model's).

Write your own in any importable module::

    # myhooks.py
    def lower_emails(tool_name: str, arguments_json: str) -> str:
        ...

    glmserve serve MODEL --argument-hook myhooks:lower_emails

A hook must return a JSON object's text (the server counts calls whose arguments do not
validate against the tool's schema in ``glmserve_tool_call_parse_failures_total``) and must
be fast: it runs on the server's event loop.  A hook that raises, or returns anything but
a JSON object's text, fails that request with a 500 (``server_error``), logged with the
tool's name and the hook's.

The function below is an *example*, not something glmserve uses by itself.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["CITY_NAMES", "example_city_names", "identity"]

CITY_NAMES: dict[str, str] = {
    "北京": "Beijing",
    "上海": "Shanghai",
    "广州": "Guangzhou",
    "深圳": "Shenzhen",
    "杭州": "Hangzhou",
    "南京": "Nanjing",
    "成都": "Chengdu",
    "武汉": "Wuhan",
    "西安": "Xi'an",
    "重庆": "Chongqing",
    "天津": "Tianjin",
    "香港": "Hong Kong",
}
"""The mapping :func:`example_city_names` applies (whole string values only)."""


def identity(tool_name: str, arguments_json: str) -> str:
    """A hook that changes nothing (the same as running without ``--argument-hook``)."""
    return arguments_json


def _map(value: Any) -> tuple[Any, bool]:
    if isinstance(value, str):
        new = CITY_NAMES.get(value.strip())
        return (new, True) if new is not None else (value, False)
    if isinstance(value, dict):
        changed = False
        out = {}
        for k, v in value.items():
            out[k], c = _map(v)
            changed |= c
        return out, changed
    if isinstance(value, list):
        changed = False
        items = []
        for v in value:
            nv, c = _map(v)
            items.append(nv)
            changed |= c
        return items, changed
    return value, False


def example_city_names(tool_name: str, arguments_json: str) -> str:
    """Example hook: replace Chinese city names with English ones, for a backend API that
    only knows ``"Beijing"`` while the model (rightly) writes ``"北京"``.

    Every string value anywhere in the arguments that is exactly one of
    :data:`CITY_NAMES` is replaced; keys and other text are left alone.  Arguments with
    no such value, or that are not valid JSON, are returned unchanged (the very same
    string), so the hook never disturbs a call it has nothing to do with.  Rewritten
    arguments are re-serialised with ``json.dumps(..., ensure_ascii=False)``.

        glmserve serve MODEL --argument-hook glmserve.hooks:example_city_names
    """
    try:
        args = json.loads(arguments_json)
    except ValueError:
        return arguments_json
    new, changed = _map(args)
    if not changed:
        return arguments_json
    return json.dumps(new, ensure_ascii=False)
