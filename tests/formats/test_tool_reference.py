"""``tool_reference`` results and deferred tools on every family.

A deferred tool (``"defer_loading": true``, Claude Code's MCP tools under tool search) is
listed nowhere up front; a tool result whose parts are ``tool_reference`` parts shows the
named tools' definitions at that result, and from there the tool is callable (parser and
decoding constraint) like a tool declared up front.  GLM-5.1 / 5.3 render it as their
templates do (checked against the templates themselves here and in ``test_format_glm5.py``);
the other families, whose templates have no such rule, show the definitions in their own
tool-definition format inside the result (golden strings below).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from glmserve.api.app import create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import FORMATS, get_format
from glmserve.formats.base import ChatRequest, TextEvent, Tool, ToolCallStart
from glmserve.formats.xmlcall import write_call

from test_format_glm5 import official

WEATHER = {"name": "get_weather", "description": "天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SEARCH = {"name": "ToolSearch", "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                "required": ["query"]}}
DEPLOY = {"name": "mcp__demo__deploy", "description": "部署",
          "parameters": {"type": "object", "properties": {"env": {"type": "string", "enum": ["prod", "dev"]}},
                         "required": ["env"]},
          "defer_loading": True}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, SEARCH, DEPLOY)]
CALL = {"id": "c1", "type": "function", "function": {"name": "ToolSearch",
                                                     "arguments": '{"query": "select:mcp__demo__deploy"}'}}
DEPLOY_NO_FLAG = {k: v for k, v in DEPLOY.items() if k != "defer_loading"}


def body(result: Any, tool_choice: Any = None) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "deploy it"}]
    if result is not None:
        msgs += [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                 {"role": "tool", "tool_call_id": "c1", "content": result}]
    b: dict[str, Any] = {"messages": msgs, "tools": TOOLS}
    if tool_choice is not None:
        b["tool_choice"] = tool_choice
    return b


REF = [{"type": "tool_reference", "tool_name": "mcp__demo__deploy"}]
_CLIENTS: dict[str, TestClient] = {}


def prompt(fmt: str, b: dict[str, Any]) -> str:
    """The prompt through the real Chat Completions mapping (``/tokenize``)."""
    if fmt not in _CLIENTS:
        _CLIENTS[fmt] = TestClient(create_app(ScriptedEngine(lambda p, s: [], model_name="m"), get_format(fmt)))
    r = _CLIENTS[fmt].post("/tokenize", json=b)
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def chat(b: dict[str, Any]) -> ChatRequest:
    """The ChatRequest a body maps to (what parser and constraint see)."""
    from glmserve.api.mapping import chat_request_from_openai
    from glmserve.api.schemas import ChatCompletionRequest

    return chat_request_from_openai(ChatCompletionRequest.model_validate({"model": "m", **b}))


# --------------------------------------------------------------------------- GLM-5.1 / 5.3: the templates


@pytest.mark.parametrize("fmt, name", [("glm51", "GLM-5.1"), ("glm53", "GLM-5.3-Flash")])
@pytest.mark.parametrize("key", ["tool_name", "name"])
def test_glm5_reference_matches_the_template(fmt: str, name: str, key: str) -> None:
    """Claude Code's ``tool_name`` and the template's ``name`` give the template's prompt."""
    ours = body([{"type": "tool_reference", key: "mcp__demo__deploy"}, {"type": "tool_reference", key: "get_weather"}])
    theirs = body([{"type": "tool_reference", "name": "mcp__demo__deploy"}, {"type": "tool_reference", "name": "get_weather"}])
    text = prompt(fmt, ours)
    assert text == official(name, theirs)
    assert text.count('"name": "mcp__demo__deploy"') == 1
    assert ('<|observation|><tool_response><tools>\n' + json.dumps(DEPLOY_NO_FLAG, ensure_ascii=False) + "\n"
            + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools></tool_response>") in text


@pytest.mark.parametrize("fmt, name", [("glm51", "GLM-5.1"), ("glm53", "GLM-5.3-Flash")])
def test_glm5_prefix_is_the_same_before_and_after_the_reference(fmt: str, name: str) -> None:
    """The system block does not change when a deferred tool is loaded (prefix caching holds)."""
    before = prompt(fmt, body(None))
    after = prompt(fmt, body(REF))
    assert before == official(name, body(None))
    head = before.split("<|user|>")[0]
    assert after.startswith(head) and "mcp__demo__deploy" not in head


@pytest.mark.parametrize("fmt", ["glm51", "glm53"])
def test_glm5_text_around_references_is_kept(fmt: str) -> None:
    """The template writes either the text (first part text) or the definitions (first part a
    reference); glmserve keeps both, in order, in the one ``<tool_response>``."""
    d = json.dumps(DEPLOY_NO_FLAG, ensure_ascii=False)
    cases = [
        ([{"type": "text", "text": "Loaded."}, *REF], f"<tool_response>Loaded.<tools>\n{d}\n</tools></tool_response>"),
        ([*REF, {"type": "text", "text": " Call it."}], f"<tool_response><tools>\n{d}\n</tools> Call it.</tool_response>"),
    ]
    for result, expected in cases:
        assert expected in prompt(fmt, body(result))


# --------------------------------------------------------------------------- other families: goldens

_WRAPPED = json.dumps({"type": "function", "function": DEPLOY_NO_FLAG}, ensure_ascii=False)
_ENTRY = ("\n## mcp__demo__deploy\n\n" + json.dumps(DEPLOY_NO_FLAG, ensure_ascii=False, indent=4)
          + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
GOLDEN_RESULT = {
    "glm45": f"<|observation|>\n<tool_response>\n<tools>\n{_WRAPPED}\n</tools>\n</tool_response><|assistant|>",
    "glm47": f"<|observation|><tool_response><tools>\n{_WRAPPED}\n</tools></tool_response><|assistant|>",
    "glm4": f"<|observation|>\n# 可用工具{_ENTRY}<|assistant|>",
    "glm4-0414": f"<|observation|>\n# 可用工具{_ENTRY}<|assistant|>",
    "glmz1": f"<|observation|>\n# 可用工具{_ENTRY}<|assistant|>",
    "chatml": f"<|im_start|>user\n<tool_response>\n<tools>\n{_WRAPPED}\n</tools>\n</tool_response><|im_end|>\n",
}


@pytest.mark.parametrize("fmt", sorted(GOLDEN_RESULT))
def test_other_families_show_the_definition_at_the_result(fmt: str) -> None:
    before = prompt(fmt, body(None))
    after = prompt(fmt, body(REF))
    assert "mcp__demo__deploy" not in before  # deferred: listed nowhere up front
    assert '"name": "get_weather"' in before  # the others are
    assert GOLDEN_RESULT[fmt] in after
    assert after.count('"name": "mcp__demo__deploy"') == 1  # only at the result...
    assert after.index('"name": "mcp__demo__deploy"') > after.index("select:mcp__demo__deploy")  # ...after the call
    assert "defer_loading" not in after


def test_every_family_has_a_golden() -> None:
    assert set(GOLDEN_RESULT) | {"glm51", "glm53"} == set(FORMATS)


def test_text_around_references_other_families() -> None:
    result = [{"type": "text", "text": "Loaded:"}, *REF, {"type": "text", "text": "go"}]
    assert f"<tool_response>Loaded:<tools>\n{_WRAPPED}\n</tools>go</tool_response>" in prompt("glm47", body(result))
    assert f"<tool_response>\nLoaded:\n<tools>\n{_WRAPPED}\n</tools>\ngo\n</tool_response>" in prompt("chatml", body(result))
    assert f"<|observation|>\nLoaded:\n# 可用工具{_ENTRY}\ngo<|assistant|>" in prompt("glm4", body(result))


def test_unknown_reference_shows_nothing_and_loads_nothing() -> None:
    """A reference to an undeclared tool renders as the template does (no definition)."""
    text = prompt("glm51", body([{"type": "tool_reference", "name": "nope"}]))
    assert "<tool_response><tools>\n</tools></tool_response>" in text
    assert [t.name for t in chat(body([{"type": "tool_reference", "name": "nope"}])).tools_in_prompt] == \
        ["get_weather", "ToolSearch"]


# --------------------------------------------------------------------------- callable from the reference on


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("choice", ["auto", "required"])
def test_constraint_has_the_deferred_tool_only_after_the_reference(fmt: str, choice: str) -> None:
    f = get_format(fmt)
    before = f.constraint(chat(body(None, choice)))
    after = f.constraint(chat(body(REF, choice)))
    assert before is not None and after is not None
    assert "mcp__demo__deploy" not in before.grammar and "get_weather" in before.grammar
    assert "mcp__demo__deploy" in after.grammar and "get_weather" in after.grammar


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_named_choice_makes_a_deferred_tool_callable(fmt: str) -> None:
    c = get_format(fmt).constraint(chat(body(None, {"type": "function", "function": {"name": "mcp__demo__deploy"}})))
    assert c is not None and "mcp__demo__deploy" in c.grammar and "get_weather" not in c.grammar


@pytest.mark.parametrize("fmt", ["glm47", "glm51", "glm53"])
def test_parser_takes_the_deferred_tool_only_after_the_reference(fmt: str) -> None:
    f = get_format(fmt)
    out = "ok</think>" + write_call("mcp__demo__deploy", {"env": "prod"}, newlines=False)

    def events(req: ChatRequest) -> list:
        p = f.parser(req)
        return p.feed(out) + p.finish()

    assert not any(isinstance(e, ToolCallStart) for e in events(chat(body(None))))
    assert any(isinstance(e, TextEvent) and "mcp__demo__deploy" in e.text for e in events(chat(body(None))))
    assert ToolCallStart(0, "mcp__demo__deploy") in events(chat(body(REF)))


def test_chatml_parser_takes_the_deferred_tool_only_after_the_reference() -> None:
    f = get_format("chatml")
    out = '<tool_call>\n{"name": "mcp__demo__deploy", "arguments": {"env": "prod"}}\n</tool_call>'
    p = f.parser(chat(body(None)))
    assert not any(isinstance(e, ToolCallStart) for e in p.feed(out) + p.finish())
    p = f.parser(chat(body(REF)))
    assert ToolCallStart(0, "mcp__demo__deploy") in p.feed(out) + p.finish()


def test_tools_in_prompt_and_listed_tools() -> None:
    tools = [Tool.from_openai(t) for t in TOOLS]
    req = ChatRequest(messages=[{"role": "user", "content": "x"}], tools=tools)
    assert [t.name for t in req.tools_in_prompt] == ["get_weather", "ToolSearch"]
    ref = ChatRequest(messages=[{"role": "tool", "content": "", "tool_references": ["mcp__demo__deploy"],
                                 "content_parts": [{"type": "tool_reference", "name": "mcp__demo__deploy"}]}], tools=tools)
    assert [t.name for t in ref.tools_in_prompt] == ["get_weather", "ToolSearch", "mcp__demo__deploy"]
    assert [t.name for t in ref.listed_tools] == ["get_weather", "ToolSearch"]
    assert ChatRequest(messages=ref.messages, tools=tools, tool_choice="none").tools_in_prompt == []


# --------------------------------------------------------------------------- Chat Completions errors


def test_reference_part_errors() -> None:
    prompt("glm51", body(None))
    c = _CLIENTS["glm51"]
    for content, needle in (([{"type": "tool_reference"}], "needs the tool's name"),
                            ([{"type": "tool_reference", "tool_name": ""}], "needs the tool's name")):
        r = c.post("/tokenize", json=body(content))
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "messages[2].content"
    r = c.post("/tokenize", json={"messages": [{"role": "user", "content": REF}]})
    assert r.status_code == 400 and "tool messages" in r.json()["error"]["message"]


def test_required_with_only_unreferenced_deferred_tools_is_a_400() -> None:
    prompt("glm47", body(None))
    b = {"messages": [{"role": "user", "content": "x"}], "tools": [TOOLS[2]], "tool_choice": "required"}
    r = _CLIENTS["glm47"].post("/v1/chat/completions", json={"model": "m", **b})
    assert r.status_code == 400 and "deferred" in r.json()["error"]["message"], r.text
