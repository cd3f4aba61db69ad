"""Prometheus metrics (``GET /metrics``).

One registry per app so that several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

_SERVER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SERVER_PHASES = ("render", "tokenize", "constraint", "prepare", "output", "total")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("glmserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("glmserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("glmserve_completion_tokens", "Completion tokens generated", registry=r)
        self.ttft = Histogram("glmserve_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("glmserve_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("glmserve_requests_running", "Requests generating in the engine", registry=r)
        self.waiting = Gauge("glmserve_requests_waiting", "Requests admitted but not yet generating", registry=r)
        self.tool_calls = Counter("glmserve_tool_calls", "Tool calls returned to clients", ["tool"], registry=r)
        self.tool_call_failures = Counter(
            "glmserve_tool_call_parse_failures", "Tool calls whose arguments were not valid JSON for the schema", registry=r
        )
        self.constraint_seconds = Histogram(
            "glmserve_constraint_build_seconds", "Time to build a decoding constraint for a request",
            buckets=(0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=r,
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
        self.rejected = Counter("glmserve_requests_rejected", "Requests refused by admission control", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
