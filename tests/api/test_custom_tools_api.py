"""Custom (freeform) tools over real HTTP with the real ``openai`` SDK, on the scripted engine.

Responses (``custom_tool_call`` items, ``response.custom_tool_call_input.*`` events, the items
sent back as history) and Chat Completions (``{"type": "custom", "custom": {name, input}}``
calls, streamed and whole), with Codex's ``apply_patch`` declaration as recorded from Codex
0.169.0.  The decoding constraint each request hands the engine is checked with xgrammar's
matcher; that it holds on vLLM is tests/e2e/test_e2e_custom_tools.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import xgrammar as xg
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from xgrammar.testing import _is_grammar_accept_string as accepts

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format
from glmserve.formats.xmlcall import write_call

DATA = Path(__file__).parents[1] / "data"
APPLY_PATCH = next(t for t in json.loads((DATA / "codex_custom_tool_request.json").read_text())["body"]["tools"]
                   if t["type"] == "custom")
SHELL = {"type": "function", "name": "exec_command", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}
TOOLS = [SHELL, APPLY_PATCH, {"type": "web_search"}]
PATCH = "*** Begin Patch\n*** Add File: 你好.txt\n+你好，\"世界\" \\ <b>\n+\ttab\n*** End Patch\n"
CALL = write_call("apply_patch", {"input": PATCH}, newlines=False)
OUTPUT = "I will write the file.</think>" + CALL


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


class Served(ThreadServer):
    def __init__(self, db: Path) -> None:
        self.output, self.size = OUTPUT, 1
        self.engine = ScriptedEngine(lambda prompt, params: pieces(self.output, self.size), model_name="m",
                                     max_model_len=65536)
        super().__init__(create_app(self.engine, get_format("glm47"), Settings(responses_db=str(db))))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=30)

    def accepted(self, text: str) -> bool:
        """Whether the constraint the engine was last given accepts ``text``."""
        constraint = self.engine.last_params.constraint
        assert constraint is not None and constraint.grammar
        return accepts(xg.Grammar.from_ebnf(constraint.grammar), text)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("custom") / "r.sqlite3")
    yield s
    s.stop()


def _comparable(r: Response) -> dict[str, Any]:
    d = r.model_dump(exclude_none=True)
    for key in ("id", "created_at", "completed_at"):
        d.pop(key, None)
    for item in d["output"]:
        item.pop("id", None)
        item.pop("call_id", None)
    return d


# --------------------------------------------------------------------------- Responses


def test_responses_custom_call_streamed_and_whole(srv) -> None:
    full = srv.client().responses.create(model="m", input="写一个文件", tools=TOOLS)
    Response.model_validate(full.model_dump())
    reasoning, call = full.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.input == PATCH
    assert call.call_id and full.status == "completed"
    # what the model was shown: a function with one string argument carrying the grammar
    assert '"name": "apply_patch"' in srv.engine.last_prompt and '"input"' in srv.engine.last_prompt
    assert json.dumps(APPLY_PATCH["format"]["definition"], ensure_ascii=False)[1:-1] in srv.engine.last_prompt
    # and what decoding was held to: the call as written is in, one that breaks the grammar is not
    assert srv.accepted("I will write the file.</think>" + CALL)
    assert not srv.accepted("I will write the file.</think>" + CALL.replace("+\ttab", "\ttab"))

    with srv.client().responses.stream(model="m", input="写一个文件", tools=TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert _comparable(final) == _comparable(full)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    item_id = final.output[1].id
    kinds = [e.type for e in events if getattr(e, "item_id", None) == item_id
             or getattr(getattr(e, "item", None), "id", None) == item_id]
    assert kinds[0] == "response.output_item.added" and kinds[-2:] == [
        "response.custom_tool_call_input.done", "response.output_item.done"]
    deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 10 and "".join(deltas) == PATCH  # streamed as generated, decoded
    done = next(e for e in events if e.type == "response.custom_tool_call_input.done")
    assert done.input == PATCH and done.output_index == 1
    added = next(e for e in events if e.type == "response.output_item.added" and e.item.type == "custom_tool_call")
    assert added.item.input == "" and added.item.name == "apply_patch"


def test_responses_custom_call_round_trip(srv) -> None:
    """The call and its output come back as items (stateless, as Codex sends them) and through
    ``previous_response_id``; both become the call and the tool result in the prompt."""
    first = srv.client().responses.create(model="m", input="写一个文件", tools=TOOLS)
    call = first.output[1]
    srv.output = "Done.</think>写好了。"
    items = [{"role": "user", "content": "写一个文件"},
             {"type": "custom_tool_call", "call_id": call.call_id, "name": "apply_patch", "input": PATCH},
             {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Success. Updated: A 你好.txt"}]
    try:
        again = srv.client().responses.create(model="m", input=items, tools=TOOLS, store=False)
        assert again.output_text == "写好了。"
        assert CALL in srv.engine.last_prompt and "Success. Updated: A 你好.txt" in srv.engine.last_prompt
        chained = srv.client().responses.create(model="m", previous_response_id=first.id, tools=TOOLS, input=[
            {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Success. Updated: A 你好.txt"}])
        assert chained.output_text == "写好了。" and CALL in srv.engine.last_prompt
    finally:
        srv.output = OUTPUT


def test_responses_named_custom_choice_and_a_cut_call(srv) -> None:
    r = srv.client().responses.create(model="m", input="x", tools=TOOLS,
                                      tool_choice={"type": "custom", "name": "apply_patch"})
    assert r.output[-1].type == "custom_tool_call"
    assert srv.accepted("I will write the file.</think>" + CALL)
    assert not srv.accepted("ok</think>" + write_call("exec_command", {"cmd": "ls"}, newlines=False))
    cut = srv.client().responses.create(model="m", input="x", tools=TOOLS, max_output_tokens=110)
    assert cut.status == "incomplete"
    item = cut.output[-1]
    assert item.type == "custom_tool_call" and item.status == "incomplete" and PATCH.startswith(item.input)


def _post(srv, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=30)


def test_bad_grammars_are_the_clients_400(srv) -> None:
    bad = {**APPLY_PATCH, "format": {"type": "grammar", "syntax": "lark", "definition": "start: missing_rule\n"}}
    r = _post(srv, "/responses", {"model": "m", "input": "x", "tools": [SHELL, bad]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[1].format", r.text
    odd = {**APPLY_PATCH, "format": {"type": "grammar", "syntax": "ebnf", "definition": "x"}}
    r = _post(srv, "/responses", {"model": "m", "input": "x", "tools": [odd]})
    assert r.status_code == 400 and "syntax" in r.json()["error"]["message"]
    # a case-insensitive terminal: xgrammar reads it, the XML family cannot keep it apart from </arg_value>
    ci = {**APPLY_PATCH, "format": {"type": "grammar", "syntax": "lark", "definition": "start: W\nW: /[a-z]+/i\n"}}
    r = _post(srv, "/responses", {"model": "m", "input": "x", "tools": [ci]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].format", r.text
    r = _post(srv, "/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "custom", "custom": {"name": "p", "format": {"type": "grammar", "grammar": {
            "syntax": "regex", "definition": "(unclosed"}}}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].custom.format", r.text


# --------------------------------------------------------------------------- Chat Completions

CHAT_TOOLS = [{"type": "function", "function": {"name": "exec_command", "parameters": SHELL["parameters"]}},
              {"type": "custom", "custom": {"name": "apply_patch", "description": APPLY_PATCH["description"],
                                            "format": {"type": "grammar", "grammar": {
                                                "syntax": "lark", "definition": APPLY_PATCH["format"]["definition"]}}}}]


def test_chat_custom_call_streamed_and_whole(srv) -> None:
    c = srv.client()
    kw: dict[str, Any] = dict(model="m", messages=[{"role": "user", "content": "写一个文件"}], tools=CHAT_TOOLS)
    r = c.chat.completions.create(**kw)
    ChatCompletion.model_validate(r.model_dump())
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "custom" and call.custom.name == "apply_patch" and call.custom.input == PATCH
    assert r.choices[0].finish_reason == "tool_calls"
    assert srv.accepted("I will write the file.</think>" + CALL)

    chunks = list(c.chat.completions.create(**kw, stream=True))
    starts = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices and tc.id]
    assert len(starts) == 1 and starts[0].type == "custom"
    assert starts[0].model_extra["custom"] == {"name": "apply_patch", "input": ""}
    parts = [tc.model_extra["custom"]["input"] for ch in chunks if ch.choices
             for tc in (ch.choices[0].delta.tool_calls or []) if not tc.id]
    assert len(parts) > 10 and "".join(parts) == PATCH
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]


def test_chat_custom_history_and_named_choice(srv) -> None:
    srv.output = "ok</think>好了"
    try:
        messages = [{"role": "user", "content": "写一个文件"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": PATCH}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "Success."}]
        r = srv.client().chat.completions.create(model="m", messages=copy.deepcopy(messages), tools=CHAT_TOOLS,
                                                 tool_choice={"type": "custom", "custom": {"name": "apply_patch"}})
        assert r.choices[0].message.content == "好了"
        assert CALL in srv.engine.last_prompt and "Success." in srv.engine.last_prompt
        assert not srv.accepted("ok</think>好了")  # the named custom tool must be called
    finally:
        srv.output = OUTPUT
