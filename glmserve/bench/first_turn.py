"""The first-turn workload: the time to first token of a coding agent's first request on a tool set
the server has never seen, against ``vllm serve`` on the same request.

Each agent CLI opens a session with one large request: its system prompt, its tool set (10-25
tools) and the user's message.  The recordings (``tests/data/first-requests/``: OpenCode, Cline,
Kilo and Qwen Code, see the README there) are replayed as recorded, streamed, with ``max_tokens``
= ``--output-tokens`` (8 in the published runs) and temperature 0, in two requests:

* **first**: the tool set made new -- every tool's schema gains one optional property whose name
  is unique to the repeat (``trace_<nonce>``), so no cache of either server can help: not
  glmserve's schema checks and grammar builds, not xgrammar's compiled grammars, not the prefix
  cache (the tools open the GLM prompt).  Both servers get the same bodies, so they prefill the
  same tokens;
* **again**: the same body once more, as the session's next turn would send the same tools and
  prompt head.  glmserve may still be compiling the new tool set's grammar in the background
  (``glmserve.api.early_start``); the workload waits until it is done
  (``glmserve_grammar_warmups_running`` back at 0, as the next turn comes after the first one's
  generation and tool run anyway) and reports how long that took (``background_s``).

Per CLI and server: TTFT of every repeat (the first chunk carrying generated text, reasoning or a
call) and the prompt tokens; for glmserve also its own time per phase on the first request
(``glmserve_server_time_seconds``).  The ratios glmserve / vLLM of the per-CLI medians are in
``first_turn_ratios`` and printed as a table (:func:`first_turn_lines`); the goal is 1.10 or less.
Repeats run one at a time: ``--concurrency`` should be 1.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

from glmserve.bench.agent import server_time, server_time_delta, stream_turn
from glmserve.bench.stats import RequestResult, percentile, ratio
from glmserve.bench.workload import LevelSpec, Workload

CLIS = ("opencode", "cline", "kilo", "qwen-code")
WAIT_LIMIT_S = 300.0


def default_requests_dir() -> Path:
    """``tests/data/first-requests`` of the source tree glmserve runs from."""
    import glmserve

    return Path(glmserve.__file__).resolve().parents[1] / "tests" / "data" / "first-requests"


def load_requests(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """The recorded request bodies by CLI name."""
    d = directory or default_requests_dir()
    missing = [c for c in CLIS if not (d / f"{c}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"first-turn workload: no recorded request for {', '.join(missing)} in {d} "
                                "(--first-requests DIR; tests/data/first-requests in the source tree)")
    return {c: json.loads((d / f"{c}.json").read_text(encoding="utf-8"))["body"] for c in CLIS}


def fresh_tool_set(body: dict[str, Any], nonce: str, model: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """``body`` with every tool's schema given a property unique to ``nonce`` (a tool set no
    cache has seen), streamed with usage, ``max_tokens`` and ``temperature`` set."""
    b = copy.deepcopy(body)
    for tool in b.get("tools") or []:
        fn = tool.get("function", tool)
        params = fn.get("parameters")
        if not isinstance(params, dict):
            params = fn["parameters"] = {"type": "object", "properties": {}}
        params.setdefault("properties", {})[f"trace_{nonce}"] = {"type": "string", "description": "trace id"}
    b.update(model=model, max_tokens=max_tokens, temperature=temperature, stream=True,
             stream_options={"include_usage": True})
    return b


async def warmups_running(client: Any, url: str) -> float | None:
    """``glmserve_grammar_warmups_running``; None where the server does not export it."""
    try:
        r = await client.get(url + "/metrics")
    except Exception:  # no metrics endpoint: nothing to wait for
        return None
    for line in r.text.splitlines() if r.status_code == 200 else []:
        if line.startswith("glmserve_grammar_warmups_running "):
            return float(line.split()[-1])
    return None


async def wait_idle(client: Any, url: str) -> float:
    """Seconds until the server compiles nothing in the background (0 for vLLM)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < WAIT_LIMIT_S:
        running = await warmups_running(client, url)
        if not running:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


class FirstTurnWorkload(Workload):
    name = "first-turn"
    help = ("the first request of OpenCode, Cline, Kilo and Qwen Code (recorded) on a tool set new to the server, "
            "then the same request again; TTFT ratios per CLI (use --concurrency 1, --output-tokens 8, a model "
            "whose context fits 19K tokens)")
    answers_with_text = False  # a random model may open a call: either is an answer

    def __init__(self) -> None:
        self._extra: dict[str, Any] = {}

    def level_extra(self) -> dict[str, Any]:
        return {"first_turn": self._extra}

    async def _session(self, client: Any, spec: LevelSpec, body: dict[str, Any], nonce: str
                       ) -> tuple[RequestResult, RequestResult, float, dict[str, float | None] | None]:
        payload = fresh_tool_set(body, nonce, spec.model_id, spec.output_tokens, spec.temperature)
        before = await server_time(client, spec.url) or {}  # nothing yet: the server's first request
        first = await stream_turn(client, spec.url, "chat", payload, spec.timeout)
        own = server_time_delta(before, await server_time(client, spec.url))
        waited = await wait_idle(client, spec.url)
        again = await stream_turn(client, spec.url, "chat", payload, spec.timeout)
        return first, again, waited, own

    async def run_level(self, spec: LevelSpec) -> tuple[list[RequestResult], float]:
        import httpx

        bodies = load_requests(spec.options.get("first_requests"))
        repeats = max(1, spec.requests)
        results: list[RequestResult] = []
        clis: dict[str, Any] = {}
        tmo = httpx.Timeout(connect=10.0, read=spec.timeout, write=60.0, pool=spec.timeout)
        t0 = time.perf_counter()
        async with httpx.AsyncClient(timeout=tmo, trust_env=False) as client:
            for k in range(repeats):
                for cli in CLIS:
                    # the same nonces for both servers (the level's first id), so they prefill the same text
                    first, again, waited, own = await self._session(client, spec, bodies[cli],
                                                                    f"{spec.first_id + k}{cli[:2]}")
                    entry = clis.setdefault(cli, {"tools": len(bodies[cli].get("tools") or []), "first_ttft_s": [],
                                                  "again_ttft_s": [], "prompt_tokens": [], "background_s": [],
                                                  "server_s_first": [], "errors": []})
                    entry["first_ttft_s"].append(first.ttft)
                    entry["again_ttft_s"].append(again.ttft)
                    entry["prompt_tokens"].append(first.prompt_tokens)
                    entry["background_s"].append(round(waited, 4))
                    entry["server_s_first"].append(own)
                    entry["errors"] += [r.error for r in (first, again) if not r.ok]
                    results += [first, again]
        wall = time.perf_counter() - t0
        for entry in clis.values():
            entry["first_p50_s"] = percentile([x for x in entry["first_ttft_s"] if x is not None], 50)
            entry["again_p50_s"] = percentile([x for x in entry["again_ttft_s"] if x is not None], 50)
        self._extra = {"repeats": repeats, "max_tokens": spec.output_tokens, "clis": clis}
        return results, wall

    async def warm_up(self, spec: LevelSpec, count: int) -> list[RequestResult]:
        """Each CLI's request on a tool set of its own (code paths, tokenizer and the engine warm;
        the measured tool sets are new all the same)."""
        import httpx

        if count <= 0:
            return []
        bodies = load_requests(spec.options.get("first_requests"))
        out: list[RequestResult] = []
        async with httpx.AsyncClient(timeout=spec.timeout, trust_env=False) as client:
            for i in range(count):
                for cli in CLIS:
                    first, again, _, _ = await self._session(client, spec, bodies[cli], f"warm{i}{uuid.uuid4().hex[:6]}")
                    out += [first, again]
        return out


FIRST_TURN = FirstTurnWorkload()


def first_turn_ratios(servers: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """glmserve / vLLM of the per-CLI median TTFT, first request and again, per level."""
    g = servers.get("glmserve", {}).get("workloads", {}).get(FIRST_TURN.name, {})
    v = servers.get("vllm", {}).get("workloads", {}).get(FIRST_TURN.name, {})
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for level, gs in g.items():
        vs = v.get(level)
        if vs is None:
            continue
        gc, vc = gs["first_turn"].get("clis", {}), vs["first_turn"].get("clis", {})
        for cli in gc:
            if cli in vc:
                out.setdefault(level, {})[cli] = {
                    "first": ratio(gc[cli]["first_p50_s"], vc[cli]["first_p50_s"]),
                    "again": ratio(gc[cli]["again_p50_s"], vc[cli]["again_p50_s"]),
                }
    return out


def median_first_turn_ratios(rounds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Each per-CLI ratio's median over rounds."""
    acc: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for r in rounds:
        for level, clis in r.items():
            for cli, figs in clis.items():
                for k, x in figs.items():
                    acc.setdefault(level, {}).setdefault(cli, {}).setdefault(k, []).append(x)
    return {level: {cli: {k: percentile([x for x in xs if x is not None], 50) for k, xs in figs.items()}
                    for cli, figs in clis.items()} for level, clis in acc.items()}


def first_turn_lines(report: dict[str, Any]) -> list[str]:
    """The per-CLI table: TTFT medians of each server (round 1) and the ratios (median of rounds)."""
    lines: list[str] = []
    servers = report.get("servers", {})
    levels = servers.get("glmserve", {}).get("workloads", {}).get(FIRST_TURN.name) or \
        servers.get("vllm", {}).get("workloads", {}).get(FIRST_TURN.name)
    if not levels:
        return lines
    ratios = report.get("first_turn_ratios") or {}
    rounds = len(report.get("first_turn_ratios_by_round") or []) or 1
    lines.append(f"first turn (TTFT p50 in ms of round 1; ratios glmserve / vLLM, median of {rounds} round(s); goal <= 1.10)")
    lines.append(f"  {'CLI':<10}{'tools':>6}{'prompt':>8}{'glmserve first':>16}{'again':>8}{'vLLM first':>12}"
                 f"{'again':>8}{'ratio first':>13}{'again':>8}{'background':>12}")
    for level in levels:
        for cli in CLIS:
            gs = ((servers.get("glmserve", {}).get("workloads", {}).get(FIRST_TURN.name) or {}).get(level) or {})
            vs = ((servers.get("vllm", {}).get("workloads", {}).get(FIRST_TURN.name) or {}).get(level) or {})
            g = (gs.get("first_turn") or {}).get("clis", {}).get(cli) or {}
            v = (vs.get("first_turn") or {}).get("clis", {}).get(cli) or {}
            r = (ratios.get(level) or {}).get(cli) or {}
            tools = g.get("tools") or v.get("tools")
            prompt = next((p for p in (g.get("prompt_tokens") or []) + (v.get("prompt_tokens") or []) if p), None)
            bg = percentile([x for x in g.get("background_s") or [] if x is not None], 50)
            lines.append(f"  {cli:<10}{tools or '-':>6}{prompt or '-':>8}{_ms(g.get('first_p50_s')):>16}"
                         f"{_ms(g.get('again_p50_s')):>8}{_ms(v.get('first_p50_s')):>12}{_ms(v.get('again_p50_s')):>8}"
                         f"{_x(r.get('first')):>13}{_x(r.get('again')):>8}{_ms(bg):>12}")
    lines.append("  (background: glmserve's compile of the new tool set still running after the first answer, ms, median)")
    return lines


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot_first_turn(report: dict[str, Any], path: Path) -> Path:
    """Bars per CLI: each server's median TTFT, first request and again (round 1), and the ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = report.get("servers", {})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.4))
    series = [(name, phase) for name in ("glmserve", "vllm") for phase in ("first", "again")]
    width = 0.8 / len(series)
    for i, (name, phase) in enumerate(series):
        levels = (servers.get(name, {}).get("workloads", {}).get(FIRST_TURN.name) or {})
        level = next(iter(levels.values()), None)
        clis = ((level or {}).get("first_turn") or {}).get("clis", {})
        ys = [((clis.get(c) or {}).get(f"{phase}_p50_s") or 0) * 1000 for c in CLIS]
        a1.bar([j - 0.4 + width * (i + 0.5) for j in range(len(CLIS))], ys, width,
               label=f"{'vLLM' if name == 'vllm' else name} {phase}", hatch="//" if phase == "again" else None)
    a1.set_xticks(range(len(CLIS)), CLIS)
    a1.set_ylabel("TTFT p50 (ms)")
    a1.set_title("Time to first token: new tool set (first), same request again")
    a1.grid(True, axis="y", alpha=0.3)
    a1.legend(fontsize=8)
    ratios = next(iter((report.get("first_turn_ratios") or {}).values()), {})
    for i, phase in enumerate(("first", "again")):
        a2.bar([j - 0.2 + 0.4 * i for j in range(len(CLIS))], [(ratios.get(c) or {}).get(phase) or 0 for c in CLIS],
               0.4, label=phase)
    a2.axhline(1.10, color="red", linestyle="--", linewidth=1, label="goal 1.10")
    a2.axhline(1.0, color="grey", linewidth=0.8)
    a2.set_xticks(range(len(CLIS)), CLIS)
    a2.set_ylabel("glmserve / vLLM TTFT (median of rounds)")
    a2.set_title("Ratio (lower: glmserve sooner)")
    a2.grid(True, axis="y", alpha=0.3)
    a2.legend(fontsize=8)
    m = report.get("machine", {})
    fig.suptitle(f"{report.get('model_name')}: first turn of four agent CLIs, glmserve vs vLLM {m.get('vllm')} "
                 f"({m.get('cpu_count')} CPUs, max_tokens {report.get('settings', {}).get('output_tokens')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
