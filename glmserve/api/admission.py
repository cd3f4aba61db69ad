"""Admission control (a bound on requests in flight) and the per-request log line."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from glmserve.api.errors import APIError
from glmserve.metrics import Metrics

request_log = logging.getLogger("glmserve.requests")


class Admission:
    """A bound on requests in flight; past it, 429 at once instead of a queue."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.in_flight = 0
        self.metrics = metrics

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at its limit of {self.limit} requests in flight; retry shortly",
                           code="too_many_requests", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.running.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.running.set(self.in_flight)


class RequestLog:
    """One line per finished request on the ``glmserve.requests`` logger: text, or one JSON
    object per line with ``--json-logs``."""

    def __init__(self, model: str, json_logs: bool = False) -> None:
        self.model = model
        self.json_logs = json_logs

    def record(self, endpoint: str, request_id: str, prompt_tokens: int, t0: float, status: int,
               extra: dict[str, Any]) -> None:
        """``t0`` is the request's ``time.perf_counter()`` at arrival."""
        elapsed = time.perf_counter() - t0
        if self.json_logs:
            request_log.info(json.dumps({"id": request_id, "endpoint": endpoint, "model": self.model, "status": status,
                                         "prompt_tokens": prompt_tokens, "latency_s": round(elapsed, 4), **extra},
                                        ensure_ascii=False))
        else:
            request_log.info("%s %s status=%s prompt_tokens=%d latency=%.3fs %s", endpoint, request_id, status,
                             prompt_tokens, elapsed, " ".join(f"{k}={v}" for k, v in extra.items()))
