"""Workloads: what traffic a level sends, and what each server gets.

A workload turns "n requests at this concurrency against this server" into timed results. The
single-turn chat workloads (``plain``, ``tools``) build independent streamed Chat Completions
requests and hand them to :func:`glmserve.bench.client.run_level`. A workload with other needs
(several turns per conversation, another endpoint such as Anthropic Messages or Responses)
subclasses :class:`Workload`, overrides :meth:`Workload.run_level`, and is added to
:data:`WORKLOADS`; the driver, statistics and report need no change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from glmserve.bench.client import run_level
from glmserve.bench.stats import RequestResult

BENCH_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_web",
            "description": "Search the web and return the top results.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
                "required": ["query"],
            },
        },
    },
]

PROMPT_HEAD = "Write a long, detailed story about a lighthouse keeper and a storm. Notes for the story:"
_FILLER = ("the old lighthouse stood on a rock above the grey sea where waves broke white every night and the keeper "
           "climbed the stairs to light the lamp while ships passed far away in the dark").split()


def build_prompt_text(target_tokens: int, count: Callable[[str], int] | None) -> str:
    """A story request padded with filler words to about ``target_tokens`` tokens."""
    words: list[str] = []
    text = PROMPT_HEAD
    if count is None:  # no tokenizer: about one token per short English word
        n = max(0, target_tokens - 16)
        return PROMPT_HEAD + " " + " ".join(_FILLER[i % len(_FILLER)] for i in range(n))
    i = 0
    while count(text) < target_tokens and i < 20 * target_tokens + 100:
        words.append(_FILLER[i % len(_FILLER)])
        i += 1
        text = PROMPT_HEAD + " " + " ".join(words)
    while words and count(text) > target_tokens:
        words.pop()
        text = PROMPT_HEAD + " " + " ".join(words)
    return text


def token_counter(model: str | None) -> Callable[[str], int] | None:
    if not model:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    except Exception:
        return None
    # the per-request id prefix ("[r123] ") is included in the count by the caller's target
    return lambda s: len(tok.encode(s, add_special_tokens=False))


def tools_for(server: str, workload: str, vllm_tools: str) -> dict[str, Any]:
    """The request fields that differ between workloads (and, for ``tools``, between servers)."""
    if workload == "plain":
        return {}
    if server == "glmserve":
        return {"tools": BENCH_TOOLS, "tool_choice": "auto"}
    if vllm_tools == "auto":
        return {"tools": BENCH_TOOLS, "tool_choice": "auto"}
    if vllm_tools == "none":
        return {"tools": BENCH_TOOLS, "tool_choice": "none"}
    return {}


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
    prompt size and the model's token counter)."""


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


class ChatWorkload(Workload):
    """Single-turn chat: a unique user message per request, with or without tools, streamed or not."""

    def __init__(self, name: str, help: str, tools: bool, stream: bool = True) -> None:
        self.name, self.help, self.tools, self.stream = name, help, tools, stream

    def fields(self, server: str, vllm_tools: str) -> dict[str, Any]:
        return tools_for(server, self.name if self.tools else "plain", vllm_tools)


WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (
        ChatWorkload("plain", "no tools", tools=False),
        ChatWorkload("plain-whole", "no tools, not streamed (no TTFT or ITL: end-to-end time and throughput)",
                     tools=False, stream=False),
        ChatWorkload("tools", "two function tools; glmserve gets tool_choice auto, vLLM what --vllm-tools says",
                     tools=True),
    )
}


# the agent workloads register themselves (glmserve.bench.agent); importing it here makes them known
import glmserve.bench.agent  # noqa: E402,F401
