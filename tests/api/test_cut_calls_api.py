"""Calls cut by the token limit, through the real SDKs over real HTTP (scripted engine).

Each API marks the cut its own way and streamed and whole answers carry the same cut call:
Chat Completions ``finish_reason: "length"`` with the call's name and arguments so far;
Responses ``status: "incomplete"`` on the response and on the ``function_call`` item;
Anthropic ``stop_reason: "max_tokens"`` with the ``tool_use`` block (its input what the
partial JSON reads as).  A call whose name was not complete is no call, and its opener
never shows as text.  The scripted engine's tokens are single characters here (the
Anthropic server's are 3), so ``max_tokens`` cuts at an exact character.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from anthropic_scripted import ScriptedServer, xml_call
from servers import ThreadServer
from tool_sets import CHAT_TOOLS

from glmserve.api.app import Settings, create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

MARKERS = ("<tool_call>", "</tool_call>", "<arg_key>", "<arg_value>", "</arg_value>", "<think>", "</think>")
CALL1 = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value><arg_key>days</arg_key>" \
        "<arg_value>3</arg_value></tool_call>"
CALL2 = "<tool_call>search<arg_key>q</arg_key><arg_value>上海天气</arg_value></tool_call>"
OUTPUT = "ok</think>Let me check." + CALL1 + CALL2
"""GLM-4.7 output: reasoning (the prompt opened it), text, two calls."""


def at(marker: str, after: int = 0) -> int:
    """The cut length ``after`` characters past the end of ``marker``'s first occurrence."""
    return OUTPUT.index(marker) + len(marker) + after


# (cut length, the calls the answer carries, whether the last one is cut)
CUTS = [
    (at("</tool_call>", 0) + len("<tool_call>"), [("get_weather", '{"city": "北京", "days": 3}')], False),
    (at("</tool_call>", 0) + len("<tool_call>sea"), [("get_weather", '{"city": "北京", "days": 3}')], False),
    (OUTPUT.index("上海") + 1, [("get_weather", '{"city": "北京", "days": 3}'), ("search", '{"q": "上')], True),
    (at("<arg_value>3") - 1, [("get_weather", '{"city": "北京"')], True),
    (OUTPUT.index("北京") + 1, [("get_weather", '{"city": "北')], True),
]


class Served(ThreadServer):
    """The real app around a ScriptedEngine replaying :data:`OUTPUT` one character a token."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.prompts: list[str] = []
        self.engine = ScriptedEngine(self._script, model_name="m")
        self.app = create_app(self.engine, get_format("glm47"), settings or Settings())
        super().__init__(self.app)

    def _script(self, prompt: str, params: Any) -> list[str]:
        self.prompts.append(prompt)
        return list(OUTPUT)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def srv():
    s = Served()
    yield s
    s.stop()


def no_markers(text: str | None) -> None:
    for m in MARKERS:
        assert m not in (text or ""), text
    assert not (text or "").endswith("<"), text


# ----------------------------------------------------------------------------- Chat Completions


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
@pytest.mark.parametrize("n, calls, cut", CUTS)
def test_chat_cut_call_same_streamed_and_whole(srv, n, calls, cut, tool_choice):
    kw: dict[str, Any] = dict(model="m", messages=[{"role": "user", "content": "北京天气？"}], tools=CHAT_TOOLS,
                              tool_choice=tool_choice, max_tokens=n)
    r = srv.client().chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "length"
    got = [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []]
    assert got == calls
    assert ch.message.content == "Let me check."
    no_markers(ch.message.content)
    streamed: dict[int, list[str]] = {}
    content, finish = "", None
    for chunk in srv.client().chat.completions.create(**kw, stream=True):
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            cur = streamed.setdefault(tc.index, ["", ""])
            cur[0] += tc.function.name or ""
            cur[1] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length" and content == ch.message.content
    assert [tuple(streamed[i]) for i in sorted(streamed)] == got


def test_chat_uncut_answer_is_tool_calls(srv):
    r = srv.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                             tools=CHAT_TOOLS, max_tokens=len(OUTPUT))
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 2


# ----------------------------------------------------------------------------- Responses

RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
                   for t in CHAT_TOOLS]


def _plain(items: list[Any]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        d = item if isinstance(item, dict) else item.model_dump(exclude_none=True)
        out.append({k: v for k, v in d.items() if k not in ("id", "call_id")})
    return out


@pytest.mark.parametrize("n, calls, cut", CUTS)
def test_responses_cut_call_is_an_incomplete_item(srv, n, calls, cut):
    kw: dict[str, Any] = dict(model="m", input="北京天气？", tools=RESPONSES_TOOLS, max_output_tokens=n,
                              store=False)
    r = srv.client().responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    fcs = [o for o in r.output if o.type == "function_call"]
    assert [(o.name, o.arguments) for o in fcs] == calls
    assert [o.status for o in fcs] == ["completed"] * (len(calls) - cut) + ["incomplete"] * cut
    texts = [c.text for o in r.output if o.type == "message" for c in o.content]
    assert texts == ["Let me check."]
    for t in texts:
        no_markers(t)
    events = list(srv.client().responses.create(**kw, stream=True))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert _plain(final.output) == _plain(r.output)
    for i, o in enumerate(final.output):
        if o.type == "function_call":
            deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                             and e.output_index == i)
            assert deltas == o.arguments
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [d.status for d in done] == [o.status for o in fcs]


# ----------------------------------------------------------------------------- Anthropic Messages

ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in CHAT_TOOLS]
A_CALL1 = xml_call("get_weather", {"city": "北京", "days": 3})
A_CALL2 = xml_call("search", {"q": "上海天气"})
A_OUTPUT = "\n<think>hm</think>\nLet me check.\n" + A_CALL1 + "\n" + A_CALL2
"""GLM-4.5 output (the Anthropic scripted server's family), 3 characters a token."""


def _tokens_to(pos: int) -> int:
    """The max_tokens whose cut lands within the 3 characters after ``pos``."""
    return pos // 3 + 1


A_CUTS = [  # (max_tokens, the tool_use blocks' (name, input), whether the last one is cut)
    (_tokens_to(A_OUTPUT.rindex("search")), [("get_weather", {"city": "北京", "days": 3})], False),
    (_tokens_to(A_OUTPUT.index("上海天气")), [("get_weather", {"city": "北京", "days": 3}), ("search", {})], True),
    (_tokens_to(A_OUTPUT.index("<arg_value>3") + len("<arg_value>")), [("get_weather", {"city": "北京"})], True),
]


@pytest.fixture(scope="module")
def asrv():
    s = ScriptedServer()
    yield s
    s.stop()


def _blocks(message: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in b.model_dump(exclude_none=True).items() if k != "id"} for b in message.content]


@pytest.mark.parametrize("max_tokens, calls, cut", A_CUTS)
def test_anthropic_cut_tool_use_block(asrv, max_tokens, calls, cut):
    asrv.output = A_OUTPUT
    kw: dict[str, Any] = dict(model="glm-test", max_tokens=max_tokens, tools=ANTHROPIC_TOOLS,
                              messages=[{"role": "user", "content": "北京天气？"}])
    m = asrv.client().messages.create(**kw)
    assert m.stop_reason == "max_tokens"
    assert [(b.name, b.input) for b in m.content if b.type == "tool_use"] == calls
    texts = [b.text for b in m.content if b.type == "text"]
    assert texts == ["Let me check."]
    for t in texts:
        no_markers(t)
    with asrv.client().messages.stream(**kw) as st:
        events = list(st)
        final = st.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert _blocks(final) == _blocks(m)
    uses = [i for i, b in enumerate(m.content) if b.type == "tool_use"]
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta"
                      and e.delta.type == "input_json_delta" and e.index == uses[-1])
    assert partial.startswith('{"') and (partial.endswith("}") != cut)


def test_responses_continue_after_a_cut_call(srv):
    """A stored answer with a cut call can be continued: the call never ran, so it is not history."""
    c = srv.client()
    r = c.responses.create(model="m", input="北京天气？", tools=RESPONSES_TOOLS, max_output_tokens=CUTS[2][0])
    assert r.output[-1].type == "function_call" and r.output[-1].status == "incomplete"
    again = c.responses.create(model="m", input="go on", tools=RESPONSES_TOOLS, previous_response_id=r.id,
                               max_output_tokens=len(OUTPUT))
    assert again.status == "completed"
    history = srv.prompts[-1]
    assert "go on" in history and history.count("<tool_call>search") == 0 and "<tool_call>get_weather" in history


def test_chat_cut_call_under_an_argument_hook_has_no_arguments():
    """The hook sees finished calls only and streams arguments whole at a call's end, so a cut
    call carries none, streamed or not (never unhooked text)."""
    hooked = Served(Settings(argument_hook=lambda name, args: args.upper()))
    try:
        c = openai.OpenAI(base_url=hooked.base_url, api_key="none", max_retries=0, timeout=30)
        kw: dict[str, Any] = dict(model="m", messages=[{"role": "user", "content": "x"}], tools=CHAT_TOOLS,
                                  max_tokens=CUTS[2][0])
        r = c.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "length"
        assert [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls] == [
            ("get_weather", '{"CITY": "北京", "DAYS": 3}'), ("search", "")]
        args: dict[int, str] = {}
        for chunk in c.chat.completions.create(**kw, stream=True):
            for tc in chunk.choices[0].delta.tool_calls or []:
                args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
        assert args == {0: '{"CITY": "北京", "DAYS": 3}', 1: ""}
    finally:
        hooked.stop()


def test_chat_cut_call_sent_back_is_rendered_as_far_as_it_got(srv):
    """A client that appends the cut answer to its history (the OpenAI SDK's loop does) is
    served: the call's arguments are the JSON prefix returned, rendered as what it holds."""
    first = srv.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "北京天气？"}],
                                                 tools=CHAT_TOOLS, max_tokens=at("<arg_value>3") - 1)
    assert first.choices[0].finish_reason == "length"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.arguments == '{"city": "北京"'
    history = [{"role": "user", "content": "北京天气？"}, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "晴"}]
    r = srv.client().chat.completions.create(model="m", messages=history, tools=CHAT_TOOLS, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert "<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>" in srv.prompts[-1]
