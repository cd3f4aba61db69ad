"""``glmserve serve`` on a scripted engine: the command's own flags, settings and HTTP server
(:func:`glmserve.cli.serve_settings`, :func:`glmserve.cli.http_config`, the supervisor), with
the engine below replacing vLLM, so the tests of the HTTP layer's bounds drive the real serving
path against a server that starts in a second.

    python tests/scripted_serve.py --port P [any glmserve serve flag] [--http h11]

The engine answers ``word `` (or ``--piece`` text) ``max_tokens`` times; a prompt containing
``pace=<seconds>`` waits that long between pieces (else it yields to the loop between them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmserve import cli  # noqa: E402
from glmserve.api.app import create_app  # noqa: E402
from glmserve.engine.base import Delta, GenerateParams  # noqa: E402
from glmserve.engine.scripted import ScriptedEngine  # noqa: E402
from glmserve.formats import get_format  # noqa: E402
from glmserve.supervise import serve_supervised  # noqa: E402

PACE = re.compile(r"pace=([0-9.]+)")


class PacedEngine(ScriptedEngine):
    """Long answers at a pace the prompt chooses (each piece made as it is sent: an answer of
    a million pieces costs nothing until it is read)."""

    def __init__(self, piece: str) -> None:
        super().__init__(lambda prompt, params: [], model_name="scripted", max_model_len=1 << 22)
        self.piece = piece

    async def generate(self, prompt_ids: list[int], params: GenerateParams, request_id: str) -> AsyncIterator[Delta]:
        await self.check_health()
        match = PACE.search("".join(chr(i) for i in prompt_ids[-2000:]))
        pace = float(match.group(1)) if match else 0.0
        self._running.add(request_id)
        try:
            for i in range(params.max_tokens):
                last = i == params.max_tokens - 1
                yield Delta(index=0, text=self.piece, num_tokens=1, finish_reason="length" if last else None)
                await asyncio.sleep(pace)  # (0: others get the loop between pieces, as with vLLM)
        finally:
            self._running.discard(request_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli._add_serve_arguments(parser.add_argument_group("glmserve serve"))
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--served-model-name", action="append", default=None)
    parser.add_argument("--http", default="auto", help="uvicorn's HTTP/1.1 parser: auto, httptools or h11")
    parser.add_argument("--piece", default="word ", help="the text of each piece the engine answers")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = cli.api_keys(args.api_key, os.environ.get("GLMSERVE_API_KEY"))
    engine = PacedEngine(args.piece)
    settings = cli.serve_settings(args, keys, args.served_model_name or ["scripted"])
    app = create_app(engine, get_format(args.chat_format or "chatml"), settings)
    server = uvicorn.Server(cli.http_config(app, settings, args, http=args.http))
    return asyncio.run(serve_supervised(server, engine, args.on_engine_death))


if __name__ == "__main__":
    raise SystemExit(main())
