"""What every workload is: :class:`LevelSpec` (one level's settings) and :class:`Workload` (the
base a new kind of traffic subclasses), apart from the registry in :mod:`glmserve.bench.workloads`
so that the workload modules (``agent``, ``vllm_client``) and the registry import this one and
never each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from glmserve.bench.client import run_level
from glmserve.bench.stats import RequestResult


def make_payload(model: str, text: str, req_id: int, max_tokens: int, temperature: float,
                 tool_fields: dict[str, Any], stream: bool = True) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"[r{req_id}] {text}"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": temperature,
        "stream": stream,
        **tool_fields,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass(frozen=True)
class LevelSpec:
    """Everything a workload needs to send one level (the same for both servers except ``server``)."""

    server: str
    url: str
    model_id: str
    text: str
    first_id: int
    requests: int
    concurrency: int
    output_tokens: int
    temperature: float
    timeout: float
    vllm_tools: str
    options: dict[str, Any] = field(default_factory=dict)
    """Workload-specific settings from the command line (the agent workload's turns, system
    prompt size and the model's token counter; the tokenizer and prompt length of vLLM's client)."""
    measuring: Callable[[], None] | None = None
    """A workload with a start-up of its own (vLLM's client imports vLLM and loads a tokenizer
    first) calls it when its requests begin: the server's CPU is counted from then."""


class Workload:
    """One kind of traffic; subclasses say which request fields it sets and how a level is sent."""

    name: str = ""
    help: str = ""
    stream: bool = True
    answers_with_text: bool = True
    """Whether its requests expect text (a tool call in the answer is then worth a note)."""

    def fields(self, server: str, vllm_tools: str) -> dict[str, Any]:
        """Request fields beyond the message (recorded in the report as what each server got)."""
        return {}

    def applies_to(self, server: str) -> bool:
        """Whether ``server`` is sent this workload (an endpoint only glmserve has is not sent to vLLM)."""
        return True

    def level_extra(self) -> dict[str, Any]:
        """Figures of the level just run beyond the per-request ones, merged into its summary."""
        return {}

    def payloads(self, spec: LevelSpec, max_tokens: int | None = None, first_id: int | None = None,
                 requests: int | None = None) -> list[dict[str, Any]]:
        fields = self.fields(spec.server, spec.vllm_tools)
        first = spec.first_id if first_id is None else first_id
        n = spec.requests if requests is None else requests
        return [make_payload(spec.model_id, spec.text, first + i, spec.output_tokens if max_tokens is None else max_tokens,
                             spec.temperature, fields, self.stream) for i in range(n)]

    async def run_level(self, spec: LevelSpec) -> tuple[list[RequestResult], float]:
        """Send the level; results per request and the level's wall time."""
        return await run_level(spec.url, self.payloads(spec), spec.concurrency, spec.timeout)

    async def warm_up(self, spec: LevelSpec, count: int) -> list[RequestResult]:
        """Short untimed requests before measuring (start-up costs stay out of the figures)."""
        warm = self.payloads(spec, max_tokens=min(8, spec.output_tokens), first_id=10_000_000, requests=count)
        results, _ = await run_level(spec.url, warm, 1, spec.timeout)
        return results
