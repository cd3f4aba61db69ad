"""The Chat Completions client: sends one level's requests, times every chunk of a streamed answer
and the whole of a non-streamed one."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from glmserve.bench.stats import RequestResult


def _has_generated(delta: dict[str, Any]) -> tuple[bool, bool]:
    """(carries generated output, carries tool-call deltas)."""
    tc = bool(delta.get("tool_calls")) or bool(delta.get("function_call"))
    text = bool(delta.get("content")) or bool(delta.get("reasoning_content")) or bool(delta.get("reasoning"))
    return text or tc, tc


async def _stream_into(res: RequestResult, client: Any, url: str, payload: dict[str, Any]) -> None:
    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            res.error = f"HTTP {resp.status_code}: {body[:300]}"
            return
        done = False
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            obj = json.loads(data)
            if obj.get("error"):
                res.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                return
            for ch in obj.get("choices") or []:
                gen, tc = _has_generated(ch.get("delta") or {})
                if gen:
                    if res.first_chunk is None:
                        res.first_chunk = now
                    res.last_chunk = now
                    res.content_chunks += 1
                res.tool_calls = res.tool_calls or tc
                if ch.get("finish_reason"):
                    res.finish_reason = ch["finish_reason"]
            usage = obj.get("usage")
            if usage:
                res.prompt_tokens = usage.get("prompt_tokens")
                res.completion_tokens = usage.get("completion_tokens")
        if done:
            res.ok = True
        else:
            res.error = "stream ended without [DONE]"


async def _whole_into(res: RequestResult, client: Any, url: str, payload: dict[str, Any]) -> None:
    """A non-streamed answer: only its end-to-end time exists (no TTFT or ITL)."""
    resp = await client.post(url + "/v1/chat/completions", json=payload)
    if resp.status_code != 200:
        res.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
        return
    body = resp.json()
    usage = body.get("usage") or {}
    res.prompt_tokens = usage.get("prompt_tokens")
    res.completion_tokens = usage.get("completion_tokens")
    for ch in body.get("choices") or []:
        res.finish_reason = ch.get("finish_reason")
        res.tool_calls = res.tool_calls or bool((ch.get("message") or {}).get("tool_calls"))
    res.ok = True


async def one_request(client: Any, url: str, payload: dict[str, Any], timeout: float) -> RequestResult:
    """Send one chat completion (streamed unless ``payload["stream"]`` is false) and time it; failures
    are recorded, never raised."""
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, end=start)
    fill = _stream_into if payload.get("stream", True) else _whole_into
    try:
        await asyncio.wait_for(fill(res, client, url, payload), timeout)
    except asyncio.TimeoutError:
        res.ok = False
        res.error = f"timeout after {timeout:.0f} s"
    except Exception as exc:  # network errors, bad JSON
        res.ok = False
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    res.finish(time.perf_counter())
    return res


async def run_level(url: str, payloads: list[dict[str, Any]], concurrency: int, timeout: float) -> tuple[list[RequestResult], float]:
    """All payloads with at most ``concurrency`` in flight; returns results and the wall time."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    tmo = httpx.Timeout(connect=10.0, read=timeout, write=30.0, pool=timeout)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=tmo, trust_env=False) as client:
        async def bounded(p: dict[str, Any]) -> RequestResult:
            async with sem:
                return await one_request(client, url, p, timeout)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in payloads))
        wall = time.perf_counter() - t0
    return list(results), wall
