"""The first token does not wait for the tool set's grammar.

vLLM compiles a request's grammar against the whole vocabulary before the request may start,
once per distinct grammar: seconds for a coding agent's 25 tools, paid on the first turn of
every session and after every restart or MCP reconnect, while ``vllm serve`` in ``auto`` mode
constrains nothing and starts at once.  glmserve keeps its promise (a call's arguments are valid
against the tool's schema) without that wait.  Where the format can split an ``auto`` answer at
its call opener (:class:`~glmserve.formats.base.CallOpener`, the XML families' ``<tool_call>``),
the answer is generated in two engine requests that continue one text, as a thinking budget does:

1. from the first token, under the format's *prelude* constraint: reasoning and text as the full
   constraint allows them, up to the call opener (a stop string).  It is the same for every tool
   set, so the engine compiled it when the server started (:meth:`GrammarWarmup.prelude`).
   Meanwhile the constraint for what follows the opener is built on a worker thread and the
   engine compiles it (:meth:`GrammarWarmup.after_opener`: a one-token warm-up request);
2. if the model opened a call: the prompt plus the output so far (its token ids exactly as
   generated, the opener's included; the prefix cache makes it cheap) continue under the tool
   set's constraint, compiled by then or still compiling (the engine then waits for it as it
   would have for the whole answer).

Consumers see one stream of deltas (the opener as a zero-token delta, since its token was
counted in the first request), which the format's parser reads like any output.  The two
constraints together allow exactly what the full one allows, so the calls are held to their
schemas as before.  Without a call nothing changes but the grammar; with one the call pays one
continuation request, on every turn (measured in ``bench/README.md``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from glmserve.engine.base import Delta, Engine, GenerateParams, continuation
from glmserve.formats.base import Constraint

log = logging.getLogger("glmserve.chat")

_GRAMMAR_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmserve-grammar")
"""Builds the tool sets' grammars off the event loop, one at a time (a second request with the
same new tool set then finds it in the format's cache)."""


@dataclass
class EarlyStart:
    """How one request's answer is split (:func:`generate_until_call`)."""

    opener: str
    build: Callable[[], Awaitable[Constraint | None]]
    """Starts building (and, once built, compiling) the constraint after the opener; awaited
    only when the model opens a call."""
    at_first_token: bool = False
    """Start that work only once a streamed answer's first token is out, not with the request:
    where the engine computes on the CPUs the server runs on, a compile started with the request
    competes with its prefill for the same cores, and the first token is what the client waits
    for.  (A whole answer, ``final_only``, has no first token to protect: it starts at once.)"""
    opened: Callable[[], None] = lambda: None
    """Called when the model opened a call and the answer continues under ``after`` (a metric)."""
    _after: Awaitable[Constraint | None] | None = None

    def after(self) -> Awaitable[Constraint | None]:
        """The constraint after the opener, its building started on the first call."""
        if self._after is None:
            self._after = self.build()
        return self._after


class GrammarWarmup:
    """Which grammars the engine has compiled, and the background work that compiles the next.

    A warm-up is a one-token engine request under the grammar: it waits for the compile like
    any request, so its end means the engine holds the compiled grammar (vLLM keeps it in
    xgrammar's cache, keyed by the grammar's text).  Warm-ups belong to no client: they run
    outside every request's lease, at most ``max_warming`` at once (beyond that a grammar
    compiles when its request reaches it), each for at most ``timeout`` seconds, and
    :meth:`close` ends them.
    """

    def __init__(self, engine: Engine, observe: Callable[[float], None] | None = None,
                 track: Callable[[int], None] | None = None, max_known: int = 512, max_warming: int = 4,
                 timeout: float = 600.0) -> None:
        self.engine = engine
        self.observe = observe
        """Called with each finished warm-up's seconds (the engine's compile, seen from here)."""
        self.track = track
        """Called with the number of warm-ups running whenever it changes (a gauge)."""
        self.max_known = max_known
        self.max_warming = max_warming
        self.timeout = timeout
        self._known: OrderedDict[str, None] = OrderedDict()
        self._warming: dict[str, asyncio.Task[None]] = {}

    @property
    def warming(self) -> int:
        return len(self._warming)

    def compiled(self, grammar: str) -> bool:
        return _digest(grammar) in self._known

    def after_opener(self, build: Callable[[], Constraint | None], probe: list[int]) -> asyncio.Future[Constraint | None]:
        """``build()`` run on the grammar thread; once it is built the engine compiles it in the
        background (``probe``: a prompt for the warm-up, one token is enough)."""
        loop = asyncio.get_running_loop()
        built = loop.run_in_executor(_GRAMMAR_POOL, build)

        def compile_next(f: asyncio.Future[Constraint | None]) -> None:
            if not f.cancelled() and f.exception() is None:
                self.warm(f.result(), probe)
            elif not f.cancelled():
                f.exception()  # retrieved here: the request that awaits it reports it

        built.add_done_callback(compile_next)
        return built

    def warm(self, constraint: Constraint | None, probe: list[int]) -> None:
        """Have the engine compile ``constraint``'s grammar in the background, unless it has it
        or is compiling it."""
        if constraint is None or constraint.grammar is None or not self.engine.compiles_grammars:
            return
        digest = _digest(constraint.grammar)
        if digest in self._known:
            self._known.move_to_end(digest)
            return
        if digest in self._warming or len(self._warming) >= self.max_warming:
            return
        # a fresh context: the warm-up is no request's engine request, so no lease aborts it
        task = asyncio.get_running_loop().create_task(self._warm(digest, constraint, probe),
                                                      context=contextvars.Context())
        self._warming[digest] = task
        task.add_done_callback(lambda _: self._done(digest))
        self._count()

    def _done(self, digest: str) -> None:
        self._warming.pop(digest, None)
        self._count()

    def _count(self) -> None:
        if self.track is not None:
            self.track(len(self._warming))

    async def prelude(self, constraints: list[Constraint], probe: list[int]) -> None:
        """Compile the preludes at start-up, before the first request (they are small: about a
        tenth of a second each)."""
        for c in constraints:
            self.warm(c, probe)
        await asyncio.gather(*self._warming.values(), return_exceptions=True)

    async def _warm(self, digest: str, constraint: Constraint, probe: list[int]) -> None:
        request_id = f"warmup-{digest[:12]}-{uuid.uuid4().hex[:8]}"
        params = GenerateParams(max_tokens=1, temperature=0.0, constraint=constraint, final_only=True)
        t0 = time.perf_counter()
        done = False
        try:
            async with asyncio.timeout(self.timeout):
                async for d in self.engine.generate(probe, params, request_id):
                    done = done or d.finish_reason is not None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the request that needs the grammar compiles it itself and reports any error
            log.warning("compiling a grammar in the background failed: %s: %s", type(exc).__name__, exc)
            return
        finally:
            if not done:
                await self.engine.abort(request_id)
        self._known[digest] = None
        while len(self._known) > self.max_known:
            self._known.popitem(last=False)
        seconds = time.perf_counter() - t0
        log.debug("grammar %s compiled in %.2f s", digest[:12], seconds)
        if self.observe is not None:
            self.observe(seconds)

    async def close(self) -> None:
        for task in list(self._warming.values()):
            task.cancel()
        await asyncio.gather(*self._warming.values(), return_exceptions=True)


def _digest(grammar: str) -> str:
    return hashlib.sha1(grammar.encode()).hexdigest()


async def generate_until_call(engine: Engine, prompt_ids: list[int], params: GenerateParams, request_id: str,
                              plan: EarlyStart) -> AsyncIterator[Delta]:
    """The deltas of one choice (``params.n == 1``, ``params.constraint`` the prelude) split at
    its first call opener (see the module's doc)."""
    current = request_id
    finished = False
    if not plan.at_first_token or params.final_only:
        plan.after()
    try:
        ids: list[int] = []
        used = 0
        end: Delta | None = None
        async for d in engine.generate(prompt_ids, replace(params, stop=[*params.stop, plan.opener]), current):
            if d.token_ids is None:
                raise RuntimeError("the engine does not report token ids, which continuing a request needs")
            plan.after()  # the first token is out (on later deltas: already started)
            ids += d.token_ids
            used += d.num_tokens
            if d.finish_reason is None:
                yield d
            else:
                end = d
        assert end is not None, "the engine ended a request without a finish reason"
        if end.stop_sequence != plan.opener or plan.opener in params.stop:  # no call: the answer is complete
            finished = True
            yield end
            return
        yield replace(end, finish_reason=None, stop_sequence=None)
        yield Delta(index=0, text=plan.opener, num_tokens=0)
        plan.opened()
        constraint = await plan.after()
        ids = prompt_ids + ids  # the opener's token included, as generated
        rest = continuation(engine, ids, params, used, constraint)
        if rest is None:
            finished = True
            yield Delta(index=0, text="", num_tokens=0, finish_reason="length")
            return
        current = f"{request_id}-call"
        async for d in engine.generate(ids, rest, current):
            finished = finished or d.finish_reason is not None
            yield d
    finally:
        if not finished:
            await engine.abort(current)
