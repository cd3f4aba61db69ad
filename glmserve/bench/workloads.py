"""Workloads: what traffic a level sends, and what each server gets; :data:`WORKLOADS` is the registry.

A workload turns "n requests at this concurrency against this server" into timed results. The
plain streamed workloads (``plain``, ``completions``) are vLLM's own benchmark client
(:mod:`glmserve.bench.vllm_client`, ``vllm bench serve``), so their figures are the ones readers
get from the tool they use. Where that client cannot do the job -- a whole (non-streamed)
answer, tools, multi-turn agents (:mod:`glmserve.bench.agent`) -- the bench's own client
(:func:`glmserve.bench.client.run_level`) sends them. A new workload subclasses
:class:`~glmserve.bench.workload.Workload`, overrides :meth:`~glmserve.bench.workload.Workload.run_level`,
and is added to :data:`WORKLOADS`; the driver, statistics and report need no change.
"""

from __future__ import annotations

from typing import Any, Callable

from glmserve.bench.agent import AGENT_WORKLOADS
from glmserve.bench.first_turn import FIRST_TURN
from glmserve.bench.vllm_client import VLLM_CLIENT_WORKLOADS
from glmserve.bench.workload import LevelSpec, Workload, make_payload

__all__ = ["WORKLOADS", "LevelSpec", "Workload", "make_payload", "tools_for", "build_prompt_text", "token_counter"]

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


class ChatWorkload(Workload):
    """Single-turn chat: a unique user message per request, with or without tools, streamed or not."""

    def __init__(self, name: str, help: str, tools: bool, stream: bool = True) -> None:
        self.name, self.help, self.tools, self.stream = name, help, tools, stream

    def fields(self, server: str, vllm_tools: str) -> dict[str, Any]:
        return tools_for(server, self.name if self.tools else "plain", vllm_tools)


WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (
        *VLLM_CLIENT_WORKLOADS,
        ChatWorkload("plain-whole", "no tools, not streamed (no TTFT or ITL: end-to-end time and throughput); "
                     "the bench's own client (vLLM's streams every chat request)", tools=False, stream=False),
        ChatWorkload("tools", "two function tools; glmserve gets tool_choice auto, vLLM what --vllm-tools says; "
                     "the bench's own client (vLLM's sends no tools)", tools=True),
        *AGENT_WORKLOADS,
        FIRST_TURN,
    )
}
"""Every workload ``--workloads`` offers, by name (a new one is added here)."""
