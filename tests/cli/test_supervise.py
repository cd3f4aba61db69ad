"""``serve_supervised`` on the real app and a real uvicorn server over real HTTP, with the scripted
engine marked dead: the policy decisions, deterministically.  The real engine dying (a killed
engine core, the PP=2 crash) is in tests/e2e/test_engine_death.py and test_scale_out.py."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
import uvicorn

from glmserve.api.app import Settings, create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format
from glmserve.supervise import ENGINE_DEAD_EXIT, serve_supervised
from servers import free_port

PIECES = [f"w{i} " for i in range(30)]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


class Case:
    def __init__(self, delay: float = 0.0, on_shutdown=None) -> None:
        self.engine = ScriptedEngine(lambda prompt, params: list(PIECES), delay=delay)
        app = create_app(self.engine, get_format("glm4"), Settings(), on_shutdown=on_shutdown)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))

    async def start(self, policy: str) -> asyncio.Task:
        task = asyncio.create_task(serve_supervised(self.server, self.engine, policy, poll_s=0.05))
        await until(lambda: self.server.started)
        return task


async def until(condition, within: float = 20.0) -> None:
    """Wait for ``condition()`` (a state another task brings about), failing after ``within`` s."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), within)


def records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "glmserve" and r.levelno == level]


def test_exit_policy_drains_in_flight_then_exits_69(caplog):
    caplog.set_level(logging.INFO)

    async def scenario() -> tuple[int, list[str]]:
        case = Case(delay=0.02)
        task = await case.start("exit")
        async with httpx.AsyncClient(base_url=case.url, timeout=30) as c:
            assert (await c.get("/health")).status_code == 200
            lines: list[str] = []
            async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) == 2:  # mid-stream: the engine dies
                        case.engine.dead = True
            code = await asyncio.wait_for(task, 20)
            with pytest.raises(httpx.ConnectError):  # the listener is closed
                await c.get("/health")
        return code, lines

    code, lines = asyncio.run(scenario())
    assert code == ENGINE_DEAD_EXIT
    # the request in flight was answered to its end before the process stopped
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content") or ""
                   for x in lines[:-1] if json.loads(x[6:])["choices"])
    assert text == "".join(PIECES)
    crit = records(caplog, logging.CRITICAL)
    assert any("the engine died (scripted engine marked dead)" in m and "status 69" in m for m in crit), crit


def test_stay_policy_keeps_answering_503_and_stops_cleanly(caplog):
    caplog.set_level(logging.INFO)

    async def scenario() -> int:
        case = Case()
        task = await case.start("stay")
        case.engine.dead = True
        await until(lambda: records(caplog, logging.ERROR))  # the watchdog's verdict, logged once
        async with httpx.AsyncClient(base_url=case.url, timeout=30) as c:
            for _ in range(2):
                r = await c.post("/v1/chat/completions", json=CHAT)
                assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
                h = await c.get("/health")
                assert h.status_code == 503 and h.json()["error"]["code"] == "engine_unavailable"
        assert not task.done()
        case.server.should_exit = True  # what SIGTERM does
        return await asyncio.wait_for(task, 20)

    assert asyncio.run(scenario()) == 0
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1 and "--on-engine-death stay" in errors[0], errors
    assert not records(caplog, logging.CRITICAL)


def test_clean_stop_that_closes_the_engine_is_no_death(caplog):
    """SIGTERM's shutdown closes the engine (vLLM then reads as errored): exit status 0, nothing logged."""
    caplog.set_level(logging.INFO)

    async def scenario() -> int:
        holder: dict = {}

        async def close() -> None:
            holder["case"].engine.dead = True
            await asyncio.sleep(0.3)  # several watchdog periods with the engine closed

        case = holder["case"] = Case(on_shutdown=close)
        task = await case.start("exit")
        async with httpx.AsyncClient(base_url=case.url, timeout=30) as c:
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        case.server.should_exit = True
        return await asyncio.wait_for(task, 20)

    assert asyncio.run(scenario()) == 0
    assert not records(caplog, logging.CRITICAL) and not records(caplog, logging.ERROR)


def test_stop_while_the_watch_sleeps_is_a_clean_exit():
    """vLLM's shutdown blocks the event loop (seconds), so the server can finish stopping while the
    watch is still asleep; that stop is status 0 (it once raised InvalidStateError)."""

    async def scenario() -> int:
        async def blocking_close() -> None:
            time.sleep(0.2)  # as AsyncLLM.shutdown(): synchronous

        case = Case(on_shutdown=blocking_close)
        task = asyncio.create_task(serve_supervised(case.server, case.engine, "exit", poll_s=3600))
        await until(lambda: case.server.started)
        case.server.should_exit = True
        return await asyncio.wait_for(task, 20)

    assert asyncio.run(scenario()) == 0


def test_unknown_policy_is_refused():
    case = Case()
    with pytest.raises(ValueError, match="on_engine_death"):
        asyncio.run(serve_supervised(case.server, case.engine, "restart"))
