"""An engine that replays scripted outputs, for fast protocol tests.

It is never the only proof of a feature: the same paths run against vLLM in the
end-to-end tests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from glmserve.engine.base import Delta, Engine, EngineUnavailable, GenerateParams
from glmserve.formats.base import Control


class ScriptedEngine(Engine):
    """``script(prompt_text, params) -> list of text pieces`` decides each answer;
    one piece is one delta (one "token")."""

    def __init__(
        self,
        script: Callable[[str, GenerateParams], list[str]],
        model_name: str = "scripted",
        max_model_len: int = 4096,
        delay: float = 0.0,
        cached_tokens: int | None = None,
    ) -> None:
        self.script = script
        self.model_name = model_name
        self.model_path = model_name
        self.max_model_len = max_model_len
        # its "tokens" are Unicode code points: a raw prompt id beyond them is the client's 400
        # (the fuzz test found chr() failing on one), as an id beyond a real vocabulary is
        self.vocab_size = 0x110000
        self.delay = delay
        self.gate: threading.Event | None = None
        """When set to an event, each request's first delta waits until it is set: a test holds
        the answer back to see what the server sends before the engine's first output.
        ``waiting`` is set once a request waits there."""
        self.waiting = threading.Event()
        self.cached_tokens = cached_tokens
        """The prefix-cache hits every request reports (at most its prompt), for protocol tests."""
        self.dead = False
        self.last_prompt: str = ""
        self.last_params: GenerateParams | None = None
        self._running: set[str] = set()
        self.aborted: list[str] = []

    def encode_parts(self, parts: list[Any]) -> list[int]:
        text = "".join(p.token if isinstance(p, Control) else p for p in parts)
        self.last_prompt = text
        return [ord(c) for c in text]

    def encode_raw(self, text: str) -> list[int]:
        self.last_prompt = text
        return [ord(c) for c in text]

    def token_id(self, token: str) -> int | None:
        return None

    def min_tokens(self, chars: int) -> int:
        return chars  # one "token" per character

    @property
    def running(self) -> int:
        return len(self._running)

    async def generate(self, prompt_ids: list[int], params: GenerateParams, request_id: str) -> AsyncIterator[Delta]:
        await self.check_health()
        self.last_params = params
        prompt = "".join(chr(i) for i in prompt_ids)
        self.last_prompt = prompt
        self._running.add(request_id)
        cached = None if self.cached_tokens is None else min(self.cached_tokens, len(prompt_ids))
        try:
            if self.gate is not None:
                self.waiting.set()
                await asyncio.to_thread(self.gate.wait, 120)  # bounded: a failed test cannot hang the server
            for index in range(params.n):
                pieces, ids, matched = _cut_at_stop(self.script(prompt, params), params.stop, params.max_tokens)
                budget = params.max_tokens
                held: list[str] = []  # final_only: the choice's pieces, sent whole at its end
                held_ids: list[int] = []
                for i, piece in enumerate(pieces[:budget]):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    last = i == min(len(pieces), budget) - 1
                    reason = None
                    if last:
                        reason = "length" if len(pieces) > budget else "stop"
                    if params.final_only:
                        held.append(piece)
                        held_ids += ids[i]
                        if not last:
                            continue
                        piece = "".join(held)
                    yield Delta(index=index, text=piece, num_tokens=len(held) if params.final_only else 1,
                                finish_reason=reason, stop_sequence=matched if last and reason == "stop" else None,
                                cached_tokens=cached, token_ids=held_ids if params.final_only else ids[i])
                if not pieces:
                    yield Delta(index=index, text="", num_tokens=0, finish_reason="stop", stop_sequence=matched,
                                cached_tokens=cached, token_ids=[])
        finally:
            self._running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineUnavailable("scripted engine marked dead")


def _cut_at_stop(pieces: list[str], stops: list[str], max_tokens: int) -> tuple[list[str], list[list[int]], str | None]:
    """The pieces up to the first stop string within the first ``max_tokens`` pieces, each
    piece's token ids (its characters' code points, as :meth:`ScriptedEngine.encode_parts`
    makes them), and that stop string (None if none occurs), as vLLM stops: the stop string
    itself is not output, but the last piece's ids run to the end of it, as vLLM keeps the id
    of the token that completed a stop string."""
    ids = [[ord(c) for c in p] for p in pieces]
    if not stops:
        return pieces, ids, None
    text = "".join(pieces[:max_tokens])
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return pieces, ids, None
    cut, matched = min(hits)
    out: list[str] = []
    pos = 0
    for piece in pieces:
        if pos + len(piece) >= cut:
            out.append(piece[: cut - pos])
            break
        out.append(piece)
        pos += len(piece)
    # the piece that held the stop string ends the output (it was one token's worth)
    ids = ids[: len(out) - 1] + [[ord(c) for c in text[pos: cut + len(matched)]]]
    return out, ids, matched
