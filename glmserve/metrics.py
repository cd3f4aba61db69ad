"""Prometheus metrics (``GET /metrics``).

One registry per app so that several servers in one process (tests) do not collide.

Every label takes its values from a set fixed by the server, never from a request: the
endpoint is the matched route's template (``/v1/responses/{response_id}``, not the id), an
unknown path is ``other``, a status outside :data:`STATUS_LABELS` is its class (``4xx``), and
tool calls are counted without the tool's name (names come from requests; the request log
has them).  So a client can grow neither the server's memory nor the scrape by sending
distinct ids, paths or tool names.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

_SERVER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SERVER_PHASES = ("render", "tokenize", "constraint", "prepare", "output", "total")

OTHER_ROUTE = "other"
"""The ``endpoint`` label of a request no route matched: a 404 of any path, and the answers
given before any route could be (the head's 408 and 431, a head the parser refuses)."""

STATUS_LABELS = frozenset({"200", "400", "401", "403", "404", "405", "408", "409", "413", "415", "422", "429", "431",
                           "499", "500", "501", "502", "503", "504"})
"""Statuses counted as themselves; any other is counted as its class (``2xx``...)."""

REASONING_DROP_REASONS = ("invalid_signature", "invalid_seal", "unsealed")
"""Why reasoning sent back by a client was not given to the model as its own."""

CUT_ENDPOINTS = ("chat", "completion", "messages", "responses")
"""The generating endpoints (``Endpoint.name``), the only values of ``glmserve_requests_cut``'s label."""
CUT_REASONS = ("disconnected", "write_timeout")
"""Why a request's answer ended before it was whole: the client went away, or stopped reading
past ``--write-timeout``."""


RENDERING: ContextVar[bool] = ContextVar("glmserve_rendering", default=False)
"""True while the current request is prepared only to say what it becomes (the render API,
:meth:`glmserve.api.runner.Services.render`): what a generated request counts (the phases of
its server time, media replaced by notes, reasoning left out) is counted once, by the request
that generates, not again by each replica a router asks to render it."""


def counted() -> bool:
    """Whether the current request's per-request figures count (see :data:`RENDERING`)."""
    return not RENDERING.get()


def route_label(scope: Mapping[str, Any]) -> str:
    """The ``endpoint`` label of a finished ASGI request: the template of the route that
    served it (FastAPI puts the route in the scope when it matches), else :data:`OTHER_ROUTE`."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else OTHER_ROUTE


def status_label(status: int) -> str:
    s = str(status)
    return s if s in STATUS_LABELS else f"{status // 100}xx"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("glmserve_requests", "HTTP requests by route template and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("glmserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("glmserve_completion_tokens", "Completion tokens generated", registry=r)
        self.ttft = Histogram("glmserve_time_to_first_token_seconds", "Time from preparing a streamed request to its first token (when its first chunk leaves)", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("glmserve_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("glmserve_requests_running", "Requests generating in the engine", registry=r)
        self.waiting = Gauge("glmserve_requests_waiting", "Requests admitted but not yet generating", registry=r)
        self.tool_calls = Counter("glmserve_tool_calls", "Tool calls returned to clients (all tools together: "
                                  "tool names come from requests and are never label values)", registry=r)
        self.tool_call_failures = Counter(
            "glmserve_tool_call_parse_failures", "Tool calls whose arguments were not valid JSON for the schema", registry=r
        )
        self.constraint_seconds = Histogram(
            "glmserve_constraint_build_seconds", "Time to build a decoding constraint for a request",
            buckets=(0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=r,
        )
        self.grammar_warmup_seconds = Histogram(
            "glmserve_grammar_warmup_seconds", "Time the engine took to compile a new tool set's grammar in the "
            "background, while that tool set's first answer was already streaming (a one-token warm-up request "
            "per grammar the engine had not compiled)", buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.grammar_warmups = Gauge(
            "glmserve_grammar_warmups_running", "Tool-set grammars the engine is compiling in the background", registry=r,
        )
        self.calls_continued = Counter(
            "glmserve_calls_continued", "Answers with tool_choice auto that opened a call and continued in a second "
            "engine request under their tool set's grammar (the first ran under a prelude grammar compiled at start-up, "
            "so it did not wait for the tool set's)",
            registry=r,
        )
        self.schema_fallbacks = Counter(
            "glmserve_tool_schema_fallbacks", "Non-strict tools whose schema xgrammar cannot compile, "
            "decoded as any JSON object (one per tool per request)", registry=r,
        )
        self.server_seconds = Histogram(
            "glmserve_server_time_seconds",
            "Time glmserve itself spends on a request outside the engine, by phase: render, tokenize, "
            "constraint (each part of prepare), prepare (all of it), output (parsing, folding and "
            "serializing the engine's deltas, wall time between receiving a delta and asking for the "
            "next), total (prepare + output, once per finished request)",
            ["phase"], buckets=_SERVER_BUCKETS, registry=r,
        )
        self.media_replaced = Counter(
            "glmserve_media_replaced", "Image, video, audio and document parts a text-only model was given as a "
            "text note instead (--image-input note)", ["kind"], registry=r,
        )
        self.write_timeouts = Counter(
            "glmserve_write_timeouts", "Connections aborted because a response's write made no progress within "
            "--write-timeout (the client stopped reading); a request cut so is logged with status 499", registry=r,
        )
        self.rejected = Counter("glmserve_requests_rejected", "Requests refused by admission control", registry=r)
        self.reasoning_dropped = Counter(
            "glmserve_reasoning_dropped", "Reasoning blocks or items sent back by a client and not given to the model "
            "as its own reasoning: invalid_signature (an Anthropic thinking block whose signature this server's "
            "secrets do not verify), invalid_seal (a Responses reasoning item whose encrypted_content does not "
            "open; any plain text beside it is dropped too), unsealed (a Responses reasoning item with plain text "
            "and no encrypted_content, sent by the client rather than read from the server's store)", ["reason"],
            registry=r,
        )
        for reason in REASONING_DROP_REASONS:
            self.reasoning_dropped.labels(reason)
        self.requests_cut = Counter(
            "glmserve_requests_cut", "Requests whose client left before the answer ended, logged with status 499: "
            "glmserve_requests counts the status that went on the wire (200 for a stream already started, "
            "none for a whole answer never sent), this counts what the client actually got. reason: "
            "disconnected or write_timeout", ["endpoint", "reason"], registry=r,
        )
        for endpoint in CUT_ENDPOINTS:
            for reason in CUT_REASONS:
                self.requests_cut.labels(endpoint, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
