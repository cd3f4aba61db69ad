"""Do other streams stall while a long prompt is prepared?  Worst inter-token gap of one
streamed answer, alone and while 60K-token prompts arrive.

    python scripts/long_prompt_gaps.py                 # scripted engine + the real SmolLM2 tokenizer
    python scripts/long_prompt_gaps.py --inline        # the same, long prompts tokenized on the event loop
    python scripts/long_prompt_gaps.py --url http://127.0.0.1:8000   # any running glmserve (real vLLM)

The scripted server runs in a child process (the client measuring the gaps must not share the
server's GIL); it streams one token every 5 ms.  On a real server with a smaller context the
long prompts are refused (400 context_length_exceeded) -- after they were rendered and
tokenized, which is the work measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

PROMPT_TOKENS = 60_000


def serve(port: int, inline: bool) -> None:
    """The child: the real app around a scripted engine that tokenizes with the real tokenizer."""
    import uvicorn
    from transformers import AutoTokenizer

    import glmserve.api.pipeline as pipeline
    from glmserve.api.app import Settings, create_app
    from glmserve.engine.scripted import ScriptedEngine
    from glmserve.engine.tokenize import PromptTokenizer
    from glmserve.formats import get_format
    from glmserve.models import default_model_dir

    if inline:
        pipeline.OFFLOAD_MIN_CHARS = 1 << 62
    tok = PromptTokenizer(AutoTokenizer.from_pretrained(str(default_model_dir())))

    class Tokenizing(ScriptedEngine):
        def encode_parts(self, parts: list[Any]) -> list[int]:
            return [i % 0x10000 for i in tok.encode_parts(parts, cache_within=self.max_model_len - 1)]

    engine = Tokenizing(lambda prompt, params: ["tok "] * min(params.max_tokens, 10_000), model_name="m",
                        max_model_len=200_000, delay=0.005)
    uvicorn.run(create_app(engine, get_format("chatml"), Settings()), host="127.0.0.1", port=port, log_level="warning")


WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()


def long_text(n: int, seed: int) -> str:
    """About ``n`` SmolLM2 tokens (common words are one token each), distinct per seed (no cache hits)."""
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(n))


async def stream_gaps(client: httpx.AsyncClient, url: str, tokens: int, model: str) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "count"}], "max_tokens": tokens,
            "stream": True, "ignore_eos": True, "temperature": 0}
    times: list[float] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


async def long_prompt(client: httpx.AsyncClient, url: str, seed: int, model: str) -> tuple[int, float]:
    t = time.perf_counter()
    r = await client.post(url + "/v1/chat/completions", json={
        "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": long_text(PROMPT_TOKENS, seed)}]})
    return r.status_code, time.perf_counter() - t


async def measure(url: str, tokens: int, n_long: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        count = await client.post(url + "/tokenize", json={"model": model, "messages": [
            {"role": "user", "content": long_text(PROMPT_TOKENS, 0)}]})
        await stream_gaps(client, url, 20, model)  # warm up
        alone = await stream_gaps(client, url, tokens, model)
        stream = asyncio.create_task(stream_gaps(client, url, tokens, model))
        await asyncio.sleep(0.3)
        longs = []
        for k in range(n_long):
            longs.append(asyncio.create_task(long_prompt(client, url, k + 1, model)))
            await asyncio.sleep(0.2)
        busy = await stream
        results = await asyncio.gather(*longs)
    return {"prompt_tokens": count.json()["count"], "long_prompts": [{"status": s, "seconds": round(t, 3)} for s, t in results],
            "worst_gap_alone_ms": round(max(alone) * 1000, 1), "worst_gap_with_long_prompts_ms": round(max(busy) * 1000, 1),
            "median_gap_ms": round(sorted(busy)[len(busy) // 2] * 1000, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="measure this running server instead of a scripted one")
    p.add_argument("--inline", action="store_true", help="scripted server: tokenize long prompts on the event loop")
    p.add_argument("--tokens", type=int, default=400, help="tokens in the measured stream (default 400)")
    p.add_argument("--long", type=int, default=3, help="60K-token prompts sent during the stream (default 3)")
    p.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_port:
        serve(a.serve_port, a.inline)
        return 0
    child = None
    url = a.url
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        child = subprocess.Popen([sys.executable, __file__, "--serve-port", str(port)] + (["--inline"] if a.inline else []),
                                 env=os.environ)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or child.poll() is not None:
                raise SystemExit("the scripted server did not start")
            time.sleep(0.3)
    try:
        out = asyncio.run(measure(url, a.tokens, a.long))
        out["mode"] = "external server" if a.url else ("scripted, tokenized inline" if a.inline else "scripted, off the loop")
        print(json.dumps(out))
    finally:
        if child is not None:
            child.terminate()
            child.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
