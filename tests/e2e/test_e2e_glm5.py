"""GLM-5.1 and GLM-5.3 on the real engine: tiny models with the GLM-5.x tokens and the official
templates (see ``tiny_models``), served by real glmserve processes, one family at a time.

The family is auto-detected from the model's chat template.  The tiny models are disposed to
close their reasoning at once and then open a call (GLM-5.3 cannot turn thinking off), so
``required`` / named / ``auto`` calls come back from real constrained decoding, with the
reasoning separated, streamed and not.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from servers import start_server
from test_e2e_glm import MSGS, SCHEMAS, TOOLS, check_answer, check_calls, streamed_calls

pytestmark = pytest.mark.e2e

MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "<arg_value>", "<|assistant|>")
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module", params=["glm51", "glm53"])
def server(request):
    """One server per family; pytest runs each family's tests before starting the next."""
    from tiny_models import build_tiny

    s = start_server(str(build_tiny(request.param)), "--served-model-name", f"tiny-{request.param}")
    s.extra["family"] = request.param
    yield s
    s.stop()


def ask(server, **kw):
    return {"model": f"tiny-{server.extra['family']}", "messages": MSGS, "tools": TOOLS, "max_tokens": 120,
            "temperature": 0, **kw}


def test_family_detected_from_template(server):
    family = server.extra["family"]
    assert httpx.get(server.url + "/version").json()["chat_format"] == family
    log = server.log()
    assert f"chat format {family}: " in log
    assert ("Reasoning Effort" if family == "glm53" else "tool_reference") in log


@pytest.mark.parametrize("tool_choice", ["required", NAMED, "auto"], ids=["required", "named", "auto"])
def test_calls_streamed_and_not(server, tool_choice):
    c = server.client()
    kw = ask(server, tool_choice=tool_choice, parallel_tool_calls=False)
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", r
    calls = ch.message.tool_calls
    assert len(calls) == 1
    check_calls(calls, ["get_weather"] if isinstance(tool_choice, dict) else None)
    for m in MARKERS:
        assert m not in (ch.message.content or "") and m not in (ch.message.model_extra.get("reasoning_content") or "")
    got, finish, chunks = streamed_calls(c.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls"
    assert [(v["name"], v["args"]) for v in got.values()] == [(x.function.name, x.function.arguments) for x in calls]
    assert all(v["ids_seen"] == 1 for v in got.values())


def test_parallel_required_calls_are_valid(server):
    c = server.client()
    for seed in range(2):
        r = c.chat.completions.create(**ask(server, tool_choice="required", seed=seed, temperature=1.0))
        # at least one finished, valid call; only the last may be cut by the token limit
        assert check_answer(r.choices[0]), r.choices[0]


def test_reasoning_effort_and_thinking_switch(server):
    """glm53 writes the effort line and keeps thinking on; glm51 turns thinking off."""
    family = server.extra["family"]
    c = server.client()
    r = c.chat.completions.create(**ask(server, tool_choice=NAMED, reasoning_effort="none"))
    assert r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments), SCHEMAS["get_weather"])
    body = {"messages": MSGS, "reasoning_effort": "high"}
    prompt = httpx.post(server.url + "/tokenize", json=body).json()["prompt"]
    off = httpx.post(server.url + "/tokenize", json={"messages": MSGS, "reasoning_effort": "none"}).json()["prompt"]
    if family == "glm53":
        assert prompt.startswith("[gMASK]<sop><|system|>Reasoning Effort: High<|user|>")
        assert off.startswith("[gMASK]<sop><|system|>Reasoning Effort: Max") and off.endswith("<|assistant|><think>")
    else:
        assert prompt.endswith("<|assistant|><think>") and off.endswith("<|assistant|></think>")


def test_agent_history_matches_the_models_own_template(server):
    """A call, a tool_reference result naming a deferred tool, and the next turn: glmserve's
    prompt is the one the model's own chat template (transformers) renders."""
    from transformers import AutoTokenizer

    from tiny_models import build_tiny

    family = server.extra["family"]
    deferred = {"type": "function", "function": {"name": "deploy", "description": "部署",
                                                 "parameters": {"type": "object", "properties": {"env": {"type": "string"}}},
                                                 "defer_loading": True}}
    tools = TOOLS + [deferred]
    c = server.client()
    r = c.chat.completions.create(**ask(server, tool_choice="required", parallel_tool_calls=False))
    msg = r.choices[0].message
    call = msg.tool_calls[0]
    history = MSGS + [msg.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": [{"type": "tool_reference", "name": "deploy"}]},
                      {"role": "user", "content": "继续"}]
    got = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": tools}).json()
    tok = AutoTokenizer.from_pretrained(str(build_tiny(family)))
    template_history = [dict(m) for m in history]
    template_history[1] = {**template_history[1], "content": template_history[1].get("content") or "",
                           "tool_calls": [{**tc, "function": {**tc["function"], "arguments": json.loads(tc["function"]["arguments"])}}
                                          for tc in template_history[1]["tool_calls"]]}
    want = tok.apply_chat_template(template_history, tools=tools, add_generation_prompt=True, tokenize=False)
    assert got["prompt"] == want
    assert '"name": "deploy"' not in got["prompt"].split("</tools>")[0]  # deferred: not in the system block
    assert '<tool_response><tools>\n{"name": "deploy"' in got["prompt"]
    for t in ("<|assistant|>", "<|observation|>", "<think>", "</think>", "<tool_call>", "<tool_response>"):
        assert got["tokens"].count(tok.convert_tokens_to_ids(t)) == want.count(t), t
    r2 = c.chat.completions.create(model=f"tiny-{family}", messages=history, tools=tools, tool_choice="none",
                                   max_tokens=8, temperature=0)
    assert r2.choices[0].message.role == "assistant"


def test_malformed_media_parts_are_400(server):
    r = httpx.post(server.base_url + "/chat/completions", json={
        "model": f"tiny-{server.extra['family']}",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "看"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[0].content[1].image_url.url" and "image_url" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


DEPLOY_SCHEMA = {"type": "object", "properties": {"env": {"type": "string", "enum": ["prod", "staging"]},
                                                  "replicas": {"type": "integer", "minimum": 1, "maximum": 9}},
                 "required": ["env", "replicas"], "additionalProperties": False}


def test_referenced_deferred_tool_is_called(server):
    """Claude Code's tool search on the real engine: a deferred MCP tool, loaded by a
    ``tool_reference`` result (``tool_name``), is then called with arguments valid against its
    schema under a named and a required ``tool_choice`` (the real anthropic SDK)."""
    import anthropic

    family = server.extra["family"]
    search = {"name": "ToolSearch", "description": "Fetches deferred tools",
              "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}
    deploy = {"name": "mcp__demo__deploy", "description": "部署服务", "input_schema": DEPLOY_SCHEMA, "defer_loading": True}
    messages = [{"role": "user", "content": "部署到生产环境"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ToolSearch",
                                                   "input": {"query": "select:mcp__demo__deploy"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "cache_control": {"type": "ephemeral"},
                                              "content": [{"type": "tool_reference", "tool_name": "mcp__demo__deploy"}]}]}]
    c = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    one = {"disable_parallel_tool_use": True}
    for tools, choice in (([search, deploy], {"type": "tool", "name": "mcp__demo__deploy", **one}),
                          ([{**search, "defer_loading": True}, deploy], {"type": "any", **one})):
        m = c.messages.create(model=f"tiny-{family}", max_tokens=200, messages=messages, tools=tools,
                              tool_choice=choice, extra_body={"temperature": 0})
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and uses, m
        assert len(uses) == 1 and uses[0].name == "mcp__demo__deploy", m
        jsonschema.validate(uses[0].input, DEPLOY_SCHEMA)
    # before the reference the same tool is not callable: required has nothing to call
    with pytest.raises(anthropic.BadRequestError) as exc:
        c.messages.create(model=f"tiny-{family}", max_tokens=50, messages=messages[:1], tools=[deploy],
                          tool_choice={"type": "any"})
    assert "deferred" in str(exc.value)


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_auto_call_on_a_new_tool_set_is_schema_valid(server):
    """A tool set the engine has never compiled: the ``auto`` answer starts under the prelude
    grammar (compiled at start-up) and its call continues under the new tool set's grammar
    (``glmserve_calls_continued``), which alone keeps the random model's arguments valid
    against the schema, streamed and not."""
    import uuid

    family = server.extra["family"]
    name = f"deploy_{uuid.uuid4().hex[:8]}"
    tool = {"type": "function", "function": {"name": name, "description": "部署服务", "parameters": DEPLOY_SCHEMA}}
    c = server.client()
    before = _metric(server, "glmserve_calls_continued_total")
    for ask_, stream in (("部署到生产环境", False), ("部署三个副本到预发环境", True), ("回滚", False)):
        kw = dict(model=f"tiny-{family}", messages=[{"role": "user", "content": ask_}], tools=[tool],
                  tool_choice="auto", parallel_tool_calls=False, max_tokens=120, temperature=0)
        if stream:
            got, finish, _ = streamed_calls(c.chat.completions.create(**kw, stream=True))
            calls = [(v["name"], v["args"]) for v in got.values()]
        else:
            ch = c.chat.completions.create(**kw).choices[0]
            finish, calls = ch.finish_reason, [(t.function.name, t.function.arguments) for t in ch.message.tool_calls or []]
        assert finish == "tool_calls" and len(calls) == 1, (finish, calls)
        assert calls[0][0] == name
        jsonschema.validate(json.loads(calls[0][1]), DEPLOY_SCHEMA)
    assert _metric(server, "glmserve_calls_continued_total") == before + 3
