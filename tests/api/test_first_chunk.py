"""The first streamed chunk of every API leaves with the engine's first output.

A client that times its first chunk (``vllm bench serve``, guidellm, aiperf) measures the time
to first token from it; a role chunk or ``message_start`` sent before the engine produced
anything made that figure a fiction.  Here the scripted engine holds its first delta behind a
gate, and an ASGI wrapper records every body write with whether the gate was open then: with
the engine waiting at the gate nothing of the body has been written, and afterwards every
stream still has its usual event sequence.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.engine.base import GenerateParams
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

CALL = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


class Gated(ThreadServer):
    """The real app on a scripted GLM-4.7 engine, behind a recorder of body writes."""

    def __init__(self) -> None:
        self.output: list[str] | Exception = []
        self.engine = ScriptedEngine(self._script, model_name="m")
        self.writes: list[tuple[bool, bytes]] = []
        """Each body write: (was the gate open, the bytes)."""
        app = create_app(self.engine, get_format("glm47"), Settings())

        async def recorder(scope: dict[str, Any], receive: Any, send: Any) -> None:
            async def record(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.body" and message.get("body"):
                    gate = self.engine.gate
                    self.writes.append((gate is None or gate.is_set(), message["body"]))
                await send(message)

            await app(scope, receive, record)

        super().__init__(recorder)

    def _script(self, prompt: str, params: GenerateParams) -> list[str]:
        if isinstance(self.output, Exception):
            raise self.output
        return list(self.output)

    def held_back(self, path: str, body: dict[str, Any], output: list[str] | Exception) -> str:
        """POST a streamed ``body``; check that nothing of the body was written while the engine
        held its first delta; return the whole body once the gate opened."""
        self.output, self.writes = output, []
        self.engine.gate, self.engine.waiting = threading.Event(), threading.Event()
        result: dict[str, Any] = {}

        def call() -> None:
            with httpx.Client(timeout=60) as client:
                r = client.post(self.base_url + path, json=body)
                result["status"], result["text"] = r.status_code, r.text

        caller = threading.Thread(target=call)
        caller.start()
        try:
            assert self.engine.waiting.wait(60), "the request never reached the engine"
            before = list(self.writes)
        finally:
            self.engine.gate.set()
            caller.join(60)
        assert before == [], f"written before the engine's first output: {before!r}"
        assert self.writes and all(opened for opened, _ in self.writes)
        assert result["status"] == 200
        return result["text"]


@pytest.fixture(scope="module")
def srv() -> Iterator[Gated]:
    s = Gated()
    yield s
    s.stop()


def data(text: str) -> list[Any]:
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
            for line in text.splitlines() if line.startswith("data: ")]


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "北京天气？"}], "stream": True}

OUTPUTS = {
    "text": pieces("</think>你好，世界"),
    "reasoning": pieces("Let me think.</think>Hi."),
    "call": pieces("</think>" + CALL),
    "empty": [],
}


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_chat_role_chunk_leaves_with_the_first_output(srv: Gated, kind: str) -> None:
    chunks = data(srv.held_back("/chat/completions", {**CHAT, "tools": TOOLS}, OUTPUTS[kind]))
    assert chunks[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls" if kind == "call" else "stop"]
    if kind == "call":
        assert deltas[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    if kind == "reasoning":
        assert "reasoning_content" in deltas[1]


def test_chat_n_and_usage(srv: Gated) -> None:
    output = pieces("</think>ok")
    chunks = data(srv.held_back("/chat/completions", {**CHAT, "n": 2, "stream_options": {"include_usage": True}},
                                output))
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:2]] == \
        [(0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 2 * len(output)


def test_chat_failure_before_the_first_output_is_in_band(srv: Gated) -> None:
    chunks = data(srv.held_back("/chat/completions", CHAT, RuntimeError("engine bug")))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # the role, then the error
    assert chunks[-2]["error"]["message"] == "internal error: RuntimeError" and chunks[-1] == "[DONE]"


@pytest.mark.parametrize("echo", [False, True])
def test_completions_first_chunk_leaves_with_the_first_output(srv: Gated, echo: bool) -> None:
    body = {"model": "m", "prompt": "Once", "max_tokens": 5, "stream": True, "echo": echo}
    chunks = data(srv.held_back("/completions", body, [" upon", " a", " time"]))
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert texts == (["Once"] if echo else []) + [" upon", " a", " time"]
    assert chunks[-1] == "[DONE]"


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_messages_start_leaves_with_the_first_output(srv: Gated, kind: str) -> None:
    body = {"model": "m", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "北京天气？"}],
            "tools": [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]}
    events = [e["type"] for e in data(srv.held_back("/messages", body, OUTPUTS[kind]))]
    assert events[:2] == ["message_start", "ping"]
    assert events[-2:] == ["message_delta", "message_stop"]
    assert events.count("message_start") == 1
    if kind != "empty":
        assert events[2] == "content_block_start"


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_responses_prelude_leaves_with_the_first_output(srv: Gated, kind: str) -> None:
    body = {"model": "m", "input": "北京天气？", "stream": True, "store": False,
            "tools": [{"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}]}
    events = data(srv.held_back("/responses", body, OUTPUTS[kind]))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    if kind != "empty":
        assert kinds[2] == "response.output_item.added"


def test_responses_failure_before_the_first_output_is_in_band(srv: Gated) -> None:
    body = {"model": "m", "input": "x", "stream": True, "store": False}
    kinds = [e["type"] for e in data(srv.held_back("/responses", body, RuntimeError("engine bug")))]
    assert kinds == ["response.created", "response.in_progress", "error", "response.failed"]
