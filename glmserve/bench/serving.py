"""``glmserve bench``: glmserve against vLLM's own OpenAI server on the same model.

Both servers are started by the bench itself, one after the other, never together (each
would otherwise steal the other's CPU): start glmserve, run the workloads, stop it; start
``python -m vllm.entrypoints.openai.api_server`` with the same model, dtype, context length,
eager mode and KV-cache size, run the same workloads, stop it. ``--glmserve-url`` /
``--vllm-url`` use servers that are already running instead.

The plain streamed workloads (``plain``: Chat Completions, ``completions``: ``/v1/completions``)
are vLLM's own benchmark client, ``vllm bench serve`` (``vllm_client.py``), one run per level:
random prompts of ``--prompt-tokens`` tokens, ``--output-tokens`` tokens with ``ignore_eos``, at
most ``--concurrency`` in flight, so the published figures come from the tool readers use. What
it cannot send, the bench's own client (``client.py``) does: ``plain-whole`` (not streamed) and
``tools`` (``workloads.py``: a user message padded to ``--prompt-tokens`` tokens, unique per
request, ``max_tokens`` with ``ignore_eos: true``), and the multi-turn agent workloads
(``agent.py``). Per request: TTFT, inter-token latency (per request: vLLM's TPOT), end-to-end
latency; per level: output tokens/s over the level's wall time and, for servers the bench
started, the CPU seconds of the API process and of the engine over the level (``cpu.py``);
glmserve/vLLM ratios (``stats.py``), a table, JSON and a plot (``report.py``). ``--rounds N``
repeats it all with the server order alternated and reports median ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import math
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from glmserve.bench.cpu import CpuMeter
from glmserve.bench.report import _f, _ms, format_report, loadavg, machine_info, plot_results, write_results
from glmserve.bench.servers import ManagedServer, free_port, server_command, server_env, served_model_id
from glmserve.bench.stats import compute_ratios, median_ratios, summarize_level
from glmserve.bench.agent import DEFAULT_SYSTEM_TOKENS, DEFAULT_TURNS, prompt_token_check
from glmserve.bench.first_turn import first_turn_lines, first_turn_ratios, median_first_turn_ratios, plot_first_turn
from glmserve.bench.workloads import WORKLOADS, LevelSpec, build_prompt_text, token_counter

SERVERS = ("glmserve", "vllm")
OWN_CLIENT = "the bench's own httpx.AsyncClient (glmserve/bench/client.py)"
DEFAULT_CONCURRENCY = (1, 8, 32)
DEFAULT_WORKLOADS = ("plain", "tools")


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.requests:
        return args.requests
    return max(args.min_requests, int(math.ceil(args.requests_factor * concurrency)))


def bench_server(name: str, url: str, args: argparse.Namespace, text: str, log: Callable[[str], None],
                 out: dict[str, Any] | None = None, cpu: CpuMeter | None = None) -> dict[str, Any]:
    """Run every workload and level against one server; figures are added to ``out`` as they come.

    ``cpu`` (servers the bench started) measures the server's CPU seconds over each level.
    """
    model_id = served_model_id(url, args.served_name)
    out = {} if out is None else out
    out.update({"url": url, "model_id": model_id, "workloads": {}, "request_fields": {}})
    req_id = 0
    for wl_name in args.workloads:
        wl = WORKLOADS[wl_name]
        if not wl.applies_to(name):
            log(f"{name}: workload {wl_name} is not sent to this server")
            continue
        fields = wl.fields(name, args.vllm_tools)
        out["request_fields"][wl_name] = {
            "tools": [t["function"]["name"] for t in fields.get("tools", [])] or None,
            "tool_choice": fields.get("tool_choice"),
        }

        def spec(c: int, n: int, first: int, measuring: Callable[[], None] | None = None) -> LevelSpec:
            return LevelSpec(server=name, url=url, model_id=model_id, text=text, first_id=first, requests=n,
                             concurrency=c, output_tokens=args.output_tokens, temperature=args.temperature,
                             timeout=args.timeout, vllm_tools=args.vllm_tools,
                             options={"agent_turns": getattr(args, "agent_turns", None),
                                      "agent_system_tokens": getattr(args, "agent_system_tokens", None),
                                      "token_count": getattr(args, "token_count", None),
                                      "tokenizer": getattr(args, "tokenizer", None),
                                      "first_requests": getattr(args, "first_requests", None),
                                      "prompt_tokens": args.prompt_tokens}, measuring=measuring)

        if args.warmup:
            bad = [r.error for r in asyncio.run(wl.warm_up(spec(1, 0, 0), args.warmup)) if not r.ok]
            if bad:
                log(f"{name} {wl_name}: warm-up failed: {bad[0]}")
        out["workloads"][wl_name] = {}
        for c in args.concurrency:
            n = requests_for(c, args)
            window = {"before": cpu.snapshot() if cpu else None}

            def measuring() -> None:  # the workload's own start-up is over: the CPU window starts here
                if cpu:
                    window["before"] = cpu.snapshot()

            results, wall = asyncio.run(wl.run_level(spec(c, n, req_id + 1, measuring)))
            before = window["before"]
            cpu_s = cpu.since(before) if cpu and before is not None else None
            req_id += n
            summary = summarize_level(results, wall, c, cpu_s)
            summary.update(wl.level_extra())
            out["workloads"][wl_name][str(c)] = summary
            per_1k = summary["cpu_s_per_1k_tokens"] or {}
            log(f"{name:<8} {wl_name:<6} conc {c:>3}: {summary['requests']} requests in {wall:6.1f} s, "
                f"{_f(summary['throughput_tok_s'])} tok/s, TTFT p50 {_ms(summary['ttft_s']['p50'])} ms, "
                f"API CPU {_f(per_1k.get('api'), '{:.3f}')} s/1K tok, "
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
            "the same workloads against it and stops it. Measures TTFT, inter-token latency, end-to-end\n"
            "latency (p50/p99), output tokens/s and the API process's CPU seconds per 1,000 output tokens per\n"
            "concurrency level, and reports glmserve/vLLM ratios (medians over --rounds). Writes\n"
            "<out-dir>/<timestamp>-<model>.json and a .png next to it, and prints a table."
        ),
        epilog=(
            "Clients: plain and completions are measured by vLLM's own client (vllm bench serve, run as a\n"
            "subprocess per level: --backend openai-chat / openai, --dataset-name random, --random-input-len\n"
            "--prompt-tokens, --random-output-len --output-tokens, --ignore-eos, --max-concurrency = the level);\n"
            "it streams every chat request and sends no tools, so plain-whole, tools and the agent workloads use\n"
            "the bench's own client. Its TTFT is the first chunk that carries a choice (vLLM's definition).\n\n"
            "What each server gets in the 'tools' workload: glmserve gets two tools with tool_choice \"auto\"; vLLM\n"
            "gets what --vllm-tools says (auto: the same tools and tool_choice \"auto\", with the server started with\n"
            "--enable-auto-tool-choice --tool-call-parser hermes; none: the tools with tool_choice \"none\", no parser\n"
            "flags; omit: no tools). Every request of the bench's own client: max_tokens=--output-tokens,\n"
            "ignore_eos=true, stream=true with stream_options.include_usage=true (plain-whole: stream=false), a\n"
            "unique user message of about --prompt-tokens tokens.\n\n"
            "Ratios are glmserve/vLLM: throughput above 1 means glmserve served more tokens/s; TTFT, ITL and E2E\n"
            "ratios below 1 mean glmserve answered sooner.\n\n"
            "Other mode: 'glmserve bench parser-cost --help' times the streaming tool-call parsers per delta."
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
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer vLLM's benchmark client draws its random prompts with (default: the model)")
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
                        "glm45 or glm47 for GLM-4.5/4.7 models; glmserve-glm4 or glmserve-glm4-0414 load glmserve's "
                        "plugin (glmserve/vllm_plugin.py) and its tools-aware template glm4_tools.jinja, so vLLM "
                        "prefills the same tokens as glmserve on GLM-4 models: use it with the agent workload)")

    w = p.add_argument_group("workload")
    w.add_argument("--workloads", type=_name_list(tuple(WORKLOADS)), default=list(DEFAULT_WORKLOADS),
                   help="comma-separated, from: " + "; ".join(f"{n} ({wl.help})" for n, wl in WORKLOADS.items())
                        + f" (default {','.join(DEFAULT_WORKLOADS)})")
    w.add_argument("--agent-turns", type=int, default=DEFAULT_TURNS,
                   help=f"turns per conversation in the agent workloads (default {DEFAULT_TURNS}); a level of "
                        "concurrency c runs c conversations at once")
    w.add_argument("--agent-system-tokens", type=int, default=DEFAULT_SYSTEM_TOKENS,
                   help=f"size of the agent workloads' system prompt in tokens (default {DEFAULT_SYSTEM_TOKENS}; "
                        "needs --max-model-len above it plus the tools and history)")
    w.add_argument("--first-requests", type=Path, default=None, metavar="DIR",
                   help="the recorded agent requests of the first-turn workload (default: tests/data/first-requests "
                        "of the source tree)")
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
    w.add_argument("--rounds", type=int, default=1,
                   help="run everything this many times, alternating which server goes first (glmserve,vllm then "
                        "vllm,glmserve, ...); ratios are the medians over rounds, the table shows round 1 "
                        "(default 1; use 3 or more on a shared machine)")
    w.add_argument("--warmup", type=int, default=2,
                   help="short untimed requests per server and workload before measuring (default 2)")
    w.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take before it counts as failed (default 300)")

    o = p.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, default=Path("bench/results"),
                   help="where <timestamp>-<model>.json and .png are written (default bench/results)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG")
    o.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (their directory is printed)")
    return p


def run_round(order: list[str], urls: dict[str, str | None], args: argparse.Namespace, model: str | None, text: str,
              log_dir: Path, log: Callable[[str], None], notes: list[str]) -> tuple[dict[str, Any], int]:
    """Each server in ``order``: start it (unless given by URL), run the workloads, stop it."""
    servers: dict[str, Any] = {}
    rc = 0
    for name in order:
        srv: ManagedServer | None = None
        entry: dict[str, Any] = {"started_by_bench": not urls[name], "load_average_before": loadavg()}
        try:
            cpu = None
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
                cpu = CpuMeter(srv.proc.pid)
            bench_server(name, url, args, text, log, out=entry, cpu=cpu)
        except KeyboardInterrupt:
            entry["error"] = "interrupted"
            notes.append(f"interrupted during {name}: partial results")
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
        servers[name] = entry
        if rc == 130:
            break
    return servers, rc


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """The serving comparison; SIGTERM interrupts it as Ctrl-C does, so the servers it started are stopped."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
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

    args.tokenizer = args.tokenizer or model
    count = token_counter(model)
    args.token_count = count
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
        "agent_turns": args.agent_turns, "agent_system_tokens": args.agent_system_tokens,
        "vllm_tool_parser": args.vllm_tool_parser if args.vllm_tools == "auto" else None,
        "warmup": args.warmup, "timeout_s": args.timeout, "rounds": args.rounds,
        "client": {wl: getattr(WORKLOADS[wl], "client", OWN_CLIENT) for wl in args.workloads},
        "tokenizer": args.tokenizer,
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
        "load_average": {"start": loadavg()},
    }
    rc = 0
    rounds: list[dict[str, Any]] = []
    for k in range(args.rounds):
        order = list(args.servers) if k % 2 == 0 else list(reversed(args.servers))
        if args.rounds > 1:
            log(f"round {k + 1} of {args.rounds}: {', '.join(order)}")
        servers, round_rc = run_round(order, urls, args, model, text, log_dir, log, report["notes"])
        rc = round_rc if round_rc == 130 else max(rc, round_rc)
        rounds.append({"order": order, "servers": servers, "ratios": compute_ratios(servers),
                       "first_turn_ratios": first_turn_ratios(servers)})
        if rc == 130:
            break
    report["servers"] = rounds[0]["servers"]
    if len(rounds) > 1:
        # round 1's figures are the top-level "servers"; later rounds keep theirs in their entry
        report["rounds"] = [{k: v for k, v in r.items() if i or k != "servers"} for i, r in enumerate(rounds)]
        report["ratios_by_round"] = [r["ratios"] for r in rounds]
    report["load_average"]["end"] = loadavg()
    report["ratios"] = median_ratios([r["ratios"] for r in rounds])
    if any(r["first_turn_ratios"] for r in rounds):
        report["first_turn_ratios"] = median_first_turn_ratios([r["first_turn_ratios"] for r in rounds])
        report["first_turn_ratios_by_round"] = [r["first_turn_ratios"] for r in rounds]
    for line in prompt_token_check(report["servers"]):
        report["notes"].append(line)
    for k, rd in enumerate(rounds):
        where = f"round {k + 1}: " if len(rounds) > 1 else ""
        for name, srv_entry in rd["servers"].items():
            for wl, levels in srv_entry.get("workloads", {}).items():
                for level, r in levels.items():
                    cm = r.get("completion_tokens_min")
                    if cm is not None and cm < args.output_tokens:
                        report["notes"].append(f"{where}{name}/{wl}/conc {level}: some requests stopped before "
                                               f"max_tokens (min {cm} of {args.output_tokens} tokens; mean "
                                               f"{r['completion_tokens_mean']:.1f}); throughput counts the tokens served")
                    if r.get("responses_with_tool_calls") and WORKLOADS[wl].answers_with_text:
                        report["notes"].append(f"{where}{name}/{wl}/conc {level}: {r['responses_with_tool_calls']} "
                                               "responses carried tool calls instead of text")
    path = write_results(report, args.out_dir, model_name, stamp)
    print(format_report(report))
    for line in first_turn_lines(report):
        print(line)
    print(f"\nwrote {path}")
    if not args.no_plot and any(e.get("workloads") for e in report["servers"].values()):
        try:
            png = plot_results(report, path.with_suffix(".png"))
            print(f"wrote {png}")
            if report.get("first_turn_ratios") or first_turn_lines(report):
                print(f"wrote {plot_first_turn(report, path.with_name(path.stem + '-first-turn.png'))}")
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
