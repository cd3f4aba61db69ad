"""``glmserve bench parser-cost``: time per streamed delta while one long tool call goes through a format's parser.

For each chat format (chatml, glm4, glm4-0414, glmz1, glm45, glm47) one ``write_file`` call whose
``content`` argument is about 1K, 8K, 32K and 128K characters long is written in that format's
wire syntax and fed to ``get_format(name).parser(...)`` one token-sized delta (4 characters) at a
time, exactly as the server feeds engine output. The figure that matters is the mean time per
delta at each size: a streaming parser that does work proportional to the *new* text keeps it
flat; one that re-scans what it has already seen makes it grow with the length (quadratic total).

For comparison, vLLM's own GLM-4.5 tool parser (``--tool-call-parser glm45``, which vLLM 0.32
registers as ``Glm47MoeModelToolParser``) is timed on the same GLM-4.5 call through its streaming
method ``extract_tool_calls_streaming(previous_text, current_text, delta_text, ...)``. The
``previous_text``/``current_text`` strings are built outside the timed region, and the parser gets
an empty vocabulary (a stub tokenizer), so it runs in its text mode; the ``<think></think>`` lead
is left off its input since vLLM's reasoning parser would have removed it. A size is skipped once
it has taken more than ``--budget`` seconds (60 by default), and every larger size with it.

Each measured run is checked: the arguments the parser produced must equal the ones written.

    glmserve bench parser-cost                  # all formats, 1K..128K, + vLLM
    glmserve bench parser-cost --sizes 1000,8000 --no-vllm --no-plot

Writes ``bench/results/<timestamp>-parser-cost.json`` and ``.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from glmserve.bench.report import machine_info

FORMATS = ["chatml", "glm4", "glm4-0414", "glmz1", "glm45", "glm47"]  # the families make_input can write
DEFAULT_SIZES = [1_000, 8_000, 32_000, 128_000]
PIECE = 4  # characters per delta: about one token
RESULTS_DIR = Path("bench/results")  # relative to the current directory, as for the serving bench
VLLM_NAME = "vllm-glm45"

TOOL = {
    "type": "function",
    "function": {
        "name": "write_file",
        "description": "Write a text file.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    },
}

# Varied text: quotes, backslashes, newlines, non-ASCII, and characters that begin markers ('<').
_LINE = 'def f(x):\n    return "a<b" if x else \'\\\\n\'  # é 世界 {json: [1, 2]}\n'


def long_content(size: int) -> str:
    reps = size // len(_LINE) + 1
    return (_LINE * reps)[:size]


def _xml_call(args: dict[str, str], newlines: bool) -> str:
    nl = "\n" if newlines else ""
    body = "".join(f"<arg_key>{k}</arg_key>{nl}<arg_value>{v}</arg_value>{nl}" for k, v in args.items())
    return f"<tool_call>write_file{nl}{body}</tool_call>"


def make_input(fmt: str, size: int) -> tuple[str, dict[str, str]]:
    """The raw model output of one ``write_file`` call in ``fmt``, and the arguments it carries."""
    args = {"path": "src/module.py", "content": long_content(size)}
    js = json.dumps(args, ensure_ascii=False)
    if fmt == "chatml":
        raw = "<tool_call>\n" + json.dumps({"name": "write_file", "arguments": args}, ensure_ascii=False) + "\n</tool_call>"
    elif fmt in ("glm4", "glm4-0414"):
        raw = "write_file\n" + js  # the prompt ends at <|assistant|>; a call starts with the name
    elif fmt == "glmz1":
        raw = "The user wants a file written.</think>\n\nwrite_file\n" + js  # output starts inside <think>
    elif fmt == "glm45":
        raw = "<think></think>\n" + _xml_call(args, newlines=True)
    elif fmt == "glm47":
        raw = "The user wants a file written.</think>" + _xml_call(args, newlines=False)  # starts inside <think>
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return raw, args


def pieces(raw: str, piece: int = PIECE) -> list[str]:
    return [raw[i : i + piece] for i in range(0, len(raw), piece)]


def _summary(times_ns: list[int], n_total: int, wall: float, ok: bool | None, note: str | None = None) -> dict[str, Any]:
    n = len(times_ns)
    tail = times_ns[-max(50, n // 10):] if n else []
    return {
        "deltas": n_total,
        "deltas_timed": n,
        "total_s": round(sum(times_ns) / 1e9, 6),
        "wall_s": round(wall, 3),
        "mean_us": round(sum(times_ns) / n / 1e3, 4) if n else None,
        "median_us": round(statistics.median(times_ns) / 1e3, 4) if n else None,
        "tail_mean_us": round(sum(tail) / len(tail) / 1e3, 4) if tail else None,
        "max_us": round(max(times_ns) / 1e3, 2) if n else None,
        "correct": ok,
        "note": note,
    }


# --------------------------------------------------------------------------- glmserve


def time_glmserve(fmt: str, size: int, piece: int = PIECE) -> dict[str, Any]:
    """Feed one call through glmserve's parser for ``fmt``; per-delta times and a correctness check."""
    from glmserve.formats import get_format
    from glmserve.formats.base import ChatRequest, Tool
    from glmserve.formats.message import MessageBuilder

    raw, args = make_input(fmt, size)
    parts = pieces(raw, piece)
    parser = get_format(fmt).parser(ChatRequest(messages=[], tools=[Tool.from_openai(TOOL)], tool_choice="auto"))
    events: list = []
    times = [0] * len(parts)
    clock = time.perf_counter_ns
    w0 = time.perf_counter()
    for i, d in enumerate(parts):
        t0 = clock()
        ev = parser.feed(d)
        times[i] = clock() - t0
        events.extend(ev)
    t0 = clock()
    events.extend(parser.finish())
    finish_ns = clock() - t0
    wall = time.perf_counter() - w0
    builder = MessageBuilder()
    builder.add(events)
    msg = builder.message()
    calls = msg.get("tool_calls") or []
    ok = len(calls) == 1 and calls[0]["function"]["name"] == "write_file" and json.loads(calls[0]["function"]["arguments"]) == args
    out = _summary(times, len(parts), wall, ok)
    out["finish_us"] = round(finish_ns / 1e3, 2)
    out["chars"] = len(raw)
    return out


# --------------------------------------------------------------------------- vLLM


def vllm_parser_available() -> str | None:
    """The import path of vLLM's GLM-4.5 tool parser, or None when this vLLM has none."""
    from glmserve.engine.vllm_parsers import glm45_tool_parser_path

    return glm45_tool_parser_path()


def time_vllm(size: int, budget_s: float, piece: int = PIECE) -> dict[str, Any]:
    """vLLM's GLM-4.5 tool parser on the glm45 input (without the ``<think></think>`` lead)."""
    from glmserve.engine.vllm_parsers import glm45_tool_parser_factory

    make, req = glm45_tool_parser_factory([TOOL])
    raw, args = make_input("glm45", size)
    raw = raw[raw.index("<tool_call>") - 1:]  # keep the "\n" before <tool_call>
    parts = pieces(raw, piece)
    parser = make()
    clock = time.perf_counter_ns
    times: list[int] = []
    deltas: list[Any] = []
    prev = ""
    w0 = time.perf_counter()
    aborted = None
    for i, d in enumerate(parts):
        cur = prev + d  # the serving layer's accumulation, outside the timed region
        t0 = clock()
        r = parser.extract_tool_calls_streaming(prev, cur, d, [], [], [], req)
        times.append(clock() - t0)
        if r is not None:
            deltas.append(r)
        prev = cur
        if (i & 63) == 0 and time.perf_counter() - w0 > budget_s:
            aborted = f"stopped after {i + 1} of {len(parts)} deltas: over the {budget_s:.0f} s budget"
            break
    wall = time.perf_counter() - w0
    ok: bool | None = None
    if aborted is None:
        r = parser.finish_streaming()
        if r is not None:
            deltas.append(r)
        name, a = None, ""
        for r in deltas:
            for tc in r.tool_calls or []:
                if tc.function is not None:
                    name = tc.function.name or name
                    a += tc.function.arguments or ""
        try:
            ok = name == "write_file" and json.loads(a) == args
        except ValueError:
            ok = False
    out = _summary(times, len(parts), wall, ok, aborted)
    out["chars"] = len(raw)
    out["skipped"] = aborted is not None
    return out


# --------------------------------------------------------------------------- driver


def run(formats: list[str], sizes: list[int], repeat: int = 3, with_vllm: bool = True, budget_s: float = 60.0,
        piece: int = PIECE, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every format at every size; returns the report (``results[name][size]``)."""
    log = log or (lambda s: None)
    results: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        results[fmt] = {}
        for size in sizes:
            runs = [time_glmserve(fmt, size, piece) for _ in range(max(1, repeat))]
            best = min(runs, key=lambda r: r["mean_us"] if r["mean_us"] is not None else float("inf"))
            best = dict(best)
            best["runs_mean_us"] = [r["mean_us"] for r in runs]
            best["correct"] = all(r["correct"] for r in runs)
            results[fmt][str(size)] = best
            log(f"{fmt:<10} {size:>7} chars: {best['mean_us']:8.2f} us/delta (tail {best['tail_mean_us']:.2f})"
                f"{'' if best['correct'] else '  WRONG ARGUMENTS'}")
    vllm_info: dict[str, Any] = {"parser": None}
    if with_vllm:
        path = vllm_parser_available()
        vllm_info["parser"] = path
        if path is None:
            vllm_info["note"] = "this vLLM ships no GLM-4.5 tool parser"
        else:
            results[VLLM_NAME] = {}
            over = False
            for size in sizes:
                if over:
                    results[VLLM_NAME][str(size)] = {"skipped": True, "note": "skipped: a smaller size ran over the budget"}
                    log(f"{VLLM_NAME:<10} {size:>7} chars: skipped (a smaller size ran over the budget)")
                    continue
                r = time_vllm(size, budget_s, piece)
                results[VLLM_NAME][str(size)] = r
                over = r["skipped"] or r["wall_s"] > budget_s
                log(f"{VLLM_NAME:<10} {size:>7} chars: {r['mean_us']:8.2f} us/delta (tail {r['tail_mean_us']:.2f})"
                    + (f"  [{r['note']}]" if r["note"] else "") + ("" if r["correct"] is not False else "  WRONG ARGUMENTS"))
    growth = {}
    for name, per in results.items():
        done = [(int(s), r) for s, r in per.items() if not r.get("skipped") and r.get("mean_us")]
        if len(done) >= 2:
            lo, hi = min(done)[1], max(done)[1]
            growth[name] = {
                "from": min(done)[0], "to": max(done)[0],
                "mean_ratio": round(hi["mean_us"] / lo["mean_us"], 3),
                "tail_ratio": round(hi["tail_mean_us"] / lo["tail_mean_us"], 3),
            }
    return {
        "kind": "parser-cost",
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),  # the same record glmserve bench writes
        "settings": {"formats": formats, "sizes": sizes, "piece_chars": piece, "repeat": repeat, "budget_s": budget_s,
                     "tool": TOOL["function"]["name"], "figure": "mean seconds per feed() call, best of `repeat` runs"},
        "vllm": vllm_info,
        "results": results,
        "growth": growth,
    }


def format_table(report: dict[str, Any]) -> str:
    sizes = report["settings"]["sizes"]
    head = f"{'parser':<12}" + "".join(f"{_k(s):>12}" for s in sizes) + f"{'growth':>10}"
    lines = ["mean time per delta (us), " + str(report["settings"]["piece_chars"]) + "-char deltas", head, "-" * len(head)]
    for name, per in report["results"].items():
        row = f"{name:<12}"
        for s in sizes:
            r = per.get(str(s), {})
            if r.get("skipped") and r.get("mean_us") is not None:
                row += f"{r['mean_us']:>11.2f}*"
            elif r.get("skipped"):
                row += f"{'skipped':>12}"
            elif r.get("mean_us") is None:
                row += f"{'-':>12}"
            else:
                row += f"{r['mean_us']:>11.2f}" + ("!" if r.get("correct") is False else " ")
        g = report["growth"].get(name)
        row += f"{g['mean_ratio']:>9.2f}x" if g else f"{'-':>10}"
        lines.append(row)
    lines.append("growth = mean at the largest size run in full / mean at the smallest; '!' = wrong arguments;")
    lines.append("'*' = stopped at the time budget: mean over the deltas timed (the first part of the call only)")
    return "\n".join(lines)


def _k(n: int) -> str:
    return f"{n // 1000}K" if n >= 1000 and n % 1000 == 0 else str(n)


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per in report["results"].items():
        xs, ys = [], []
        for s, r in sorted(per.items(), key=lambda kv: int(kv[0])):
            if not r.get("skipped") and r.get("mean_us"):
                xs.append(int(s))
                ys.append(r["mean_us"])
        style = "--" if name == VLLM_NAME else "-"
        line = ax.plot(xs, ys, style, marker="o", label=name)[0]
        partial = [(int(s), r["mean_us"]) for s, r in per.items() if r.get("skipped") and r.get("mean_us")]
        if partial:
            ax.plot([p[0] for p in partial], [p[1] for p in partial], linestyle="none", marker="o", mfc="none",
                    color=line.get_color(), label=f"{name}: stopped at budget (partial mean)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tool-call arguments (characters)")
    ax.set_ylabel("mean time per 4-char delta (µs)")
    m = report["machine"]
    ax.set_title(f"Streaming parser cost per delta ({m.get('cpu_count')} CPUs, {m.get('machine')})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def replot(json_path: Path) -> Path:
    """Redraw the PNG of a saved report (``glmserve bench parser-cost --replot FILE.json``)."""
    report = json.loads(Path(json_path).read_text(encoding="utf-8"))
    print(format_table(report))
    return plot(report, Path(json_path).with_suffix(".png"))


def write(report: dict[str, Any], out_dir: Path, with_plot: bool = True) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    jpath = out_dir / f"{stamp}-parser-cost.json"
    jpath.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ppath = plot(report, jpath.with_suffix(".png")) if with_plot else None
    return jpath, ppath


def _int_list(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if not x:
            continue
        mult = 1000 if x.endswith("k") else 1
        out.append(int(float(x.rstrip("k")) * mult))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="glmserve bench parser-cost",
        description="Time glmserve's streaming tool-call parsers (and vLLM's GLM-4.5 parser) per delta on one long call.")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated formats (default: {','.join(FORMATS)})")
    p.add_argument("--sizes", default="1k,8k,32k,128k", help="argument sizes in characters, e.g. 1k,8k,32k,128k (default)")
    p.add_argument("--piece", type=int, default=PIECE, help=f"characters per delta (default {PIECE}, about a token)")
    p.add_argument("--repeat", type=int, default=3, help="runs per glmserve format and size; the best mean is kept (default 3)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds one vLLM size may take before it (and every larger size) is skipped (default 60)")
    p.add_argument("--no-vllm", action="store_true", help="do not time vLLM's GLM-4.5 tool parser")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=f"where JSON and PNG go (default {RESULTS_DIR})")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--no-plot", action="store_true", help="write the JSON without the PNG")
    p.add_argument("--replot", type=Path, metavar="JSON", help="print the table of a saved report and redraw its PNG, then exit")
    a = p.parse_args(argv)
    if a.replot:
        print(f"wrote {replot(a.replot)}")
        return 0
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        p.error(f"unknown format(s): {', '.join(bad)}")
    report = run(formats, _int_list(a.sizes), a.repeat, not a.no_vllm, a.budget, a.piece,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(report))
    if not a.no_write:
        jpath, ppath = write(report, a.out_dir, not a.no_plot)
        print(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
    wrong = [n for n, per in report["results"].items() for r in per.values() if r.get("correct") is False]
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
