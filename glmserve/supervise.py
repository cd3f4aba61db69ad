"""What ``glmserve serve`` does when its engine dies: exit so that a supervisor restarts it, or stay.

A vLLM engine core that died (a crash in a worker, the process killed, out of memory) never comes
back: ``AsyncLLM`` stays errored and every request after it can only get 503.  A server that stays
up then looks alive to a process supervisor while serving nothing.  So by default
(``--on-engine-death exit``) glmserve stops the way SIGTERM stops it -- the listener closes,
requests in flight end (with 503: their engine is gone), the engine is shut down -- and exits with
status 69 (``EX_UNAVAILABLE``), which systemd's ``Restart=on-failure`` and Kubernetes act on.
vLLM's own server does the same (unless ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1``).
``--on-engine-death stay`` keeps the server up for inspection: ``/health`` and every request answer
503 ``engine_unavailable`` until it is stopped.  Either way the death is logged once, loudly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from glmserve.engine.base import Engine, EngineUnavailable

log = logging.getLogger("glmserve")

ENGINE_DEAD_EXIT = 69
"""Exit status after the engine died (sysexits ``EX_UNAVAILABLE``)."""
POLICIES = ("exit", "stay")
POLL_S = 0.5
"""How often the engine's health is read (cheap: a flag in vLLM), so a death is acted on within it."""


class StoppableServer(Protocol):
    """What is used of ``uvicorn.Server``."""

    should_exit: bool

    async def serve(self) -> None: ...


async def serve_supervised(server: StoppableServer, engine: Engine, on_engine_death: str = "exit",
                           poll_s: float = POLL_S) -> int:
    """Run ``server`` until it stops; the process's exit status: 0, or ``ENGINE_DEAD_EXIT`` when it
    stopped because the engine died and ``on_engine_death`` is ``exit``."""
    if on_engine_death not in POLICIES:
        raise ValueError(f"on_engine_death must be one of {POLICIES}, not {on_engine_death!r}")
    watch = asyncio.create_task(_watch(server, engine, on_engine_death, poll_s), name="glmserve-engine-watch")
    try:
        await server.serve()
    finally:
        # vLLM's shutdown blocks the loop for seconds, so the watch may still be asleep here
        watch.cancel()
        await asyncio.wait([watch])
    reason = None if watch.cancelled() else watch.result()
    if reason is None or on_engine_death == "stay":
        return 0
    log.critical("glmserve exits with status %d: the engine died (%s)", ENGINE_DEAD_EXIT, reason)
    return ENGINE_DEAD_EXIT


async def _watch(server: StoppableServer, engine: Engine, policy: str, poll_s: float) -> str | None:
    """The reason the engine died, once it has; None when the server began stopping first (its
    shutdown closes the engine, which then reads as dead: that is no death)."""
    while not server.should_exit:
        try:
            await engine.check_health()
        except EngineUnavailable as exc:
            if server.should_exit:
                return None
            reason = str(exc) or "engine died"
            if policy == "exit":
                log.critical("the engine died (%s): stopping -- requests in flight end with 503, then glmserve "
                             "exits with status %d so that its supervisor restarts it (--on-engine-death stay "
                             "keeps it up answering 503)", reason, ENGINE_DEAD_EXIT)
                server.should_exit = True
            else:
                log.error("the engine died (%s): staying up as --on-engine-death stay asks; /health and every "
                          "request answer 503 until glmserve is restarted", reason)
            return reason
        await asyncio.sleep(poll_s)
    return None
