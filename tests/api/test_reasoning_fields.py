"""Reasoning under both of its Chat Completions names, over real HTTP with the ``openai`` client.

vLLM renamed ``reasoning_content`` to ``reasoning`` (its PR #33402; vLLM 0.32 sends only
``reasoning`` and takes either back), DeepSeek and older servers say ``reasoning_content``,
and clients read one or the other (the AI SDK ``reasoning_content ?? reasoning``).  glmserve
takes either on an assistant message and sends both.
"""

from __future__ import annotations

import openai
import pytest

from servers import ThreadServer

from glmserve.api.app import create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format


class Server(ThreadServer):
    def __init__(self) -> None:
        self.engine = ScriptedEngine(lambda prompt, params: ["let me ", "think", "</think>", "It is ", "sunny."],
                                     model_name="m")
        super().__init__(create_app(self.engine, get_format("glm47")))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def srv():
    s = Server()
    yield s
    s.stop()


def history(**reasoning: str) -> list[dict]:
    """A conversation whose assistant turn after the last user message keeps its reasoning."""
    return [{"role": "user", "content": "天气？"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}], **reasoning},
            {"role": "tool", "tool_call_id": "c1", "content": "晴"}]


@pytest.mark.parametrize("fields, shown", [
    ({"reasoning_content": "OLD-NAME"}, "OLD-NAME"),
    ({"reasoning": "NEW-NAME"}, "NEW-NAME"),
    ({"reasoning": "NEW-NAME", "reasoning_content": "OLD-NAME"}, "NEW-NAME"),  # as vLLM: reasoning wins
])
def test_either_name_is_the_turns_reasoning(srv: Server, fields: dict[str, str], shown: str) -> None:
    srv.client().chat.completions.create(model="m", messages=history(**fields), max_tokens=8)
    assert f"<think>{shown}</think>" in srv.engine.last_prompt
    assert "NAME" not in srv.engine.last_prompt.replace(f"<think>{shown}</think>", "")


def test_both_names_are_sent_whole_and_streamed(srv: Server) -> None:
    msg = srv.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "天气？"}],
                                               max_tokens=32).choices[0].message
    assert msg.content == "It is sunny."
    assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"] == "let me think"
    chunks = list(srv.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "天气？"}],
                                                       max_tokens=32, stream=True))
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    with_reasoning = [d for d in deltas if "reasoning" in d or "reasoning_content" in d]
    assert with_reasoning and all(d["reasoning"] == d["reasoning_content"] for d in with_reasoning)
    assert "".join(d["reasoning"] for d in with_reasoning) == "let me think"
    # the streamed message sent back (as the AI SDK and the OpenAI SDK loop do) is read once
    back = history(reasoning="let me think", reasoning_content="let me think")
    srv.client().chat.completions.create(model="m", messages=back, max_tokens=8)
    assert srv.engine.last_prompt.count("let me think") == 1
