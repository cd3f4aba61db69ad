"""Nothing a request carries blocks the event loop: while 8 MiB prompts arrive on each
generating endpoint (Chat Completions, Completions, Messages, Responses), or a request declaring
200 tools never seen before, another client's stream keeps getting its tokens.

Against the real server (``glmserve serve``, the embedded default model on vLLM, a 2048-token
context): one streamed chat answer runs while an 8 MiB prompt is posted to each endpoint in
turn; every prompt is refused (400 ``context_length_exceeded``: it cannot fit), and the worst
gap between the stream's tokens over each post is measured.  A server that tokenizes such a
prompt on its event loop stalls every stream for the tokenizer's whole run: seconds (an 8 MiB
prompt is 7-15 s of the SmolLM2 tokenizer on these cores, which is what ``/v1/completions``
did); one that refuses it before tokenizing (``Engine.min_tokens``), parses, validates and
renders it in tens of milliseconds.  The schema work of 200 new tools (checks, the constraint)
is done by a worker thread while the loop keeps serving (checked on the loop by pure-Python
jsonschema, it stalled it 1.6-8.9 s).  The bound sits between the two with room for a loaded
2-core machine on both sides.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
PROMPT_BYTES = 8 * 1024 * 1024 - 64 * 1024
"""An 8 MiB prompt, less room for the JSON around it (the body limit is 8 MiB)."""
WORST_GAP = 2.5
"""Seconds: the most the other stream may wait for a token while one such prompt is handled."""
ENDPOINTS = {
    "chat": ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
    "completions": ("/v1/completions", lambda text: {"prompt": text, "max_tokens": 1}),
    "messages": ("/v1/messages", lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
    "responses": ("/v1/responses", lambda text: {"input": text, "max_output_tokens": 16, "store": False}),
}


def tool_set(n: int) -> list[dict]:
    """``n`` tools, ~2 KB of schema each, each schema new (the server caches schema checks)."""
    salt = uuid.uuid4().hex[:8]

    def schema(i: int) -> dict:
        props = {f"f{salt}_{i}_{j}": {"type": ["string", "integer", "boolean"][j % 3], "description": "a value " * 6}
                 for j in range(12)}
        props["options"] = {"type": "object", "properties": {f"o{j}": {"type": "array", "items": {
            "type": "string", "enum": [f"v{k}" for k in range(5)]}} for j in range(6)}, "required": ["o0"]}
        return {"type": "object", "properties": props, "required": [f"f{salt}_{i}_0"]}

    return [{"type": "function", "function": {"name": f"tool_{salt}_{i}", "description": "does a thing " * 8,
                                              "parameters": schema(i)}} for i in range(n)]


def big_prompt() -> str:
    words = ("the quick brown fox jumps over the lazy dog while seven wizards quietly judge "
             "boxing matches in a hazy tavern ").split()
    out, n, k = [], 0, 0
    while n < PROMPT_BYTES:
        w = words[k % len(words)] + (" " if k % 13 else ". ")
        out.append(w)
        n += len(w)
        k += 1
    return "".join(out)[:PROMPT_BYTES]


async def stall(client: httpx.AsyncClient, url: str, path: str, body: bytes) -> tuple[float, float, int]:
    """``(worst gap between another stream's tokens over the post, worst gap before it, the
    post's status)``: a streamed chat answer runs, ``body`` is posted to ``path`` meanwhile."""
    tokens: list[float] = []

    async def stream() -> None:
        req = {"model": MODEL, "messages": [{"role": "user", "content": "Count to a thousand."}],
               "max_tokens": 2000, "ignore_eos": True, "stream": True, "temperature": 0}
        async with client.stream("POST", url + "/v1/chat/completions", json=req) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    tokens.append(time.perf_counter())

    task = asyncio.create_task(stream())
    try:
        while len(tokens) < 10 and not task.done():  # the stream is flowing
            await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        r = await client.post(url + path, content=body, headers={"Content-Type": "application/json"})
        t1 = time.perf_counter()
        seen = len(tokens)
        while len(tokens) == seen and not task.done():  # the first token after the post ends its gap
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    gaps = list(zip(tokens, tokens[1:]))
    during = max((b - a for a, b in gaps if b >= t0 and a <= t1), default=0.0)
    before = max((b - a for a, b in gaps if b < t0), default=0.0)
    return during, before, r.status_code


async def measure(url: str) -> dict[str, tuple[float, float, int]]:
    text = big_prompt()
    bodies = {name: json.dumps({"model": MODEL, **make(text)}).encode() for name, (_, make) in ENDPOINTS.items()}
    # and a tool set of 200 new tools (their schemas are checked before the prompt is measured)
    bodies["tools"] = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "tools": tool_set(200), "max_tokens": 1}).encode()
    assert all(len(b) <= 8 * 1024 * 1024 for b in bodies.values())  # within the body limit
    async with httpx.AsyncClient(timeout=600) as client:
        paths = {name: path for name, (path, _) in ENDPOINTS.items()} | {"tools": "/v1/chat/completions"}
        return {name: await stall(client, url, path, bodies[name]) for name, path in paths.items()}


def test_eight_mib_prompts_do_not_stall_another_stream(default_server):
    seen = asyncio.run(measure(default_server.url))
    print("worst gap between another stream's tokens while an 8 MiB prompt is handled (s), and before it: "
          + ", ".join(f"{name} {during:.3f} ({before:.3f})" for name, (during, before, _) in seen.items()))
    assert {name: status for name, (_, _, status) in seen.items()} == {name: 400 for name in seen}  # cannot fit
    assert all(during < WORST_GAP for during, _, _ in seen.values()), seen
