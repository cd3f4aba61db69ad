"""Statistics of a benchmark run: per-request timings, per-level summaries, glmserve/vLLM ratios."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable


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
    cached_tokens: int | None = None
    """Of ``prompt_tokens``, those the server's prefix cache served (its usage says so)."""
    completion_tokens: int | None = None
    finish_reason: str | None = None
    tool_calls: bool = False
    error: str | None = None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def finish(self, end: float) -> None:
        """Close the request at ``end``: TTFT from the first generated chunk, ITL over the rest."""
        self.end = end
        if self.ok and self.first_chunk is not None:
            self.ttft = self.first_chunk - self.start
            n = self.completion_tokens
            if n and n > 1 and self.last_chunk is not None:
                self.itl = (self.last_chunk - self.first_chunk) / (n - 1)


def _stats(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": (sum(values) / len(values)) if values else None,
        "max": max(values) if values else None,
    }


def summarize_level(results: list[RequestResult], wall_s: float, concurrency: int,
                    cpu_s: dict[str, float] | None = None) -> dict[str, Any]:
    """Figures for one concurrency level; ``requests`` keeps the raw per-request numbers.

    ``cpu_s`` is the CPU time the server's processes spent during the level (``cpu.py``): the
    API process (HTTP, rendering, parsing, detokenizing) and the engine processes below it.
    """
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    per_1k = ({k: v * 1000 / out_tokens for k, v in cpu_s.items()} if cpu_s is not None and out_tokens else None)
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
        "cpu_s": cpu_s,
        "cpu_s_per_1k_tokens": per_1k,
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
                "api_cpu_per_1k": ratio(_api_cpu(gs), _api_cpu(vs)),
            }
    return out


def _api_cpu(summary: dict[str, Any]) -> float | None:
    return (summary.get("cpu_s_per_1k_tokens") or {}).get("api")


def median_ratios(rounds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Each ratio's median over rounds (alternating server order evens out drift on a shared machine)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in rounds:
        for wl, levels in r.items():
            for level, figures in levels.items():
                slot = out.setdefault(wl, {}).setdefault(level, {})
                for k, v in figures.items():
                    slot.setdefault(k, []).append(v)  # type: ignore[union-attr]
    return {wl: {level: {k: percentile(vs, 50) for k, vs in figs.items()}  # type: ignore[arg-type]
                 for level, figs in levels.items()} for wl, levels in out.items()}
