"""glmserve's GLM-4 parser as a vLLM tool-parser plugin (``glmserve/vllm_plugin.py``).

Unit tests drive the plugin classes directly with the tiny model's tokenizer, the way
vLLM's serving layer does; one end-to-end test runs vLLM's own OpenAI server
(``python -m vllm.entrypoints.openai.api_server``) with ``--tool-parser-plugin`` and the
GLM-4 tools template shipped in ``glmserve/templates/glm4_tools.jinja``.
"""

from __future__ import annotations

import glmserve

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from conftest import load_jsonl

pytest.importorskip("vllm")

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.tool_parsers import ToolParserManager  # noqa: E402

import glmserve.vllm_plugin as plugin  # noqa: E402
from glmserve.formats import get_format  # noqa: E402
from glmserve.formats.base import ChatRequest, Tool  # noqa: E402

PLUGIN_PATH = str(Path(plugin.__file__).resolve())
TEMPLATE = Path(glmserve.__file__).parent / "templates" / "glm4_tools.jinja"

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                     "required": ["tz"]}}},
]


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_models import build_tiny
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(build_tiny("glm4")))


def request(tool_choice="auto", tools=TOOLS, **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "北京天气?"}], tools=tools,
                                 tool_choice=tool_choice, **kw)


def stream(parser_cls, tokenizer, req, pieces, garble_context=False):
    """Feed ``pieces`` as vLLM's engine-based streaming does; returns (content, calls, ids per call)."""
    p = parser_cls(tokenizer, req.tools)
    content, calls, ids = [], {}, {}
    prev = ""
    deltas = []
    for piece in pieces:
        cur = prev + piece
        # engine-based parsers get only the delta; garbling the rest proves nothing else is read
        args = ("garbage" * 3, "x", piece) if garble_context else ("", piece, piece)
        deltas.append(p.extract_tool_calls_streaming(*args, [], [], [], req))
        prev = cur
    deltas.append(p.finish_streaming())
    for d in deltas:
        if d is None:
            continue
        if d.content:
            content.append(d.content)
        for tc in d.tool_calls:
            slot = calls.setdefault(tc.index, {"name": None, "arguments": ""})
            if tc.id is not None:
                ids.setdefault(tc.index, []).append(tc.id)
            if tc.function is not None:
                if tc.function.name is not None:
                    assert slot["name"] is None, "name streamed twice"
                    slot["name"] = tc.function.name
                slot["arguments"] += tc.function.arguments or ""
    return "".join(content), [calls[i] for i in sorted(calls)], ids


# --------------------------------------------------------------------------- registration


def test_registered_under_both_names():
    assert ToolParserManager.get_tool_parser("glmserve-glm4") is plugin.GLMServeGLM4ToolParser
    assert ToolParserManager.get_tool_parser("glmserve-glm4-0414") is plugin.GLMServeGLM40414ToolParser
    # routed to our parser for required/named, and fed deltas + finish_streaming
    assert plugin.GLMServeGLM4ToolParser.supports_required_and_named is False
    assert plugin.GLMServeGLM4ToolParser.engine_based_streaming is True


def test_loads_by_file_path_like_vllm_does():
    code = (
        "from vllm.tool_parsers import ToolParserManager as M\n"
        f"M.import_tool_parser({PLUGIN_PATH!r})\n"
        "print(M.get_tool_parser('glmserve-glm4').__name__, M.get_tool_parser('glmserve-glm4-0414').__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["GLMServeGLM4ToolParser", "GLMServeGLM40414ToolParser"]


# --------------------------------------------------------------------------- non-streaming


@pytest.mark.parametrize("output, names, args, content", [
    ('get_weather\n{"city": "北京", "unit": "c"}', ["get_weather"], [{"city": "北京", "unit": "c"}], None),
    # two calls separated by <|assistant|> (special tokens kept), and run together (skipped)
    ('get_weather\n{"city": "北京", "unit": "c"}<|assistant|>get_time\n{"tz": "Asia/Shanghai"}',
     ["get_weather", "get_time"], [{"city": "北京", "unit": "c"}, {"tz": "Asia/Shanghai"}], None),
    ('get_time\n{"tz": "UTC"}get_time\n{"tz": "CET"}', ["get_time", "get_time"], [{"tz": "UTC"}, {"tz": "CET"}], None),
    # a plain answer starts with the empty metadata line, which is not content
    ("\n北京今天晴。", [], [], "北京今天晴。"),
    # an undeclared name is text, not a call
    ('search\n{"q": "x"}', [], [], 'search\n{"q": "x"}'),
    # a call cut off by max_tokens is not a call
    ('get_weather\n{"city": "北', [], [], None),
])
def test_extract_tool_calls(tokenizer, output, names, args, content):
    p = plugin.GLMServeGLM4ToolParser(tokenizer, request().tools)
    info = p.extract_tool_calls(output, request())
    assert info.tools_called == bool(names)
    assert [c.function.name for c in info.tool_calls] == names
    assert [json.loads(c.function.arguments) for c in info.tool_calls] == args
    assert info.content == content
    assert len({c.id for c in info.tool_calls}) == len(names)
    for c in info.tool_calls:
        assert c.function.arguments in output  # the model's own text: Chinese kept, never re-serialised


def test_glm4_0414_variant_accepts_space_after_name(tokenizer):
    p = plugin.GLMServeGLM40414ToolParser(tokenizer, request().tools)
    info = p.extract_tool_calls('get_time \n{"tz": "UTC"}', request())
    assert [(c.function.name, c.function.arguments) for c in info.tool_calls] == [("get_time", '{"tz": "UTC"}')]


def test_tool_choice_none_and_no_tools_leave_text(tokenizer):
    p = plugin.GLMServeGLM4ToolParser(tokenizer, None)
    info = p.extract_tool_calls('get_time\n{"tz": "UTC"}', request(tool_choice="none"))
    assert not info.tools_called and info.content == 'get_time\n{"tz": "UTC"}'


# --------------------------------------------------------------------------- streaming

OUTPUTS = [
    'get_weather\n{"city": "北京", "unit": "c"}',
    'get_weather\n{"city": "上海", "unit": "f"}<|assistant|>get_time\n{"tz": "Asia/Shanghai"}',
    "\n今天北京晴，最高 25 度。",
    'get_tim',  # a name prefix that never completes: text, flushed by finish_streaming
    '\nUse get_time\n{"tz": "x"} maybe',
]


@pytest.mark.parametrize("output", OUTPUTS)
def test_streaming_matches_non_streaming_for_any_split(tokenizer, output):
    req = request()
    whole = plugin.GLMServeGLM4ToolParser(tokenizer, req.tools).extract_tool_calls(output, req)
    expect_calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.tool_calls]
    rng = random.Random(7)
    splits = [[output], list(output)]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(output)), k=min(len(output) - 1, rng.randint(1, 6))))
        splits.append([output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)])])
    for pieces in splits:
        content, calls, ids = stream(plugin.GLMServeGLM4ToolParser, tokenizer, req, pieces)
        assert calls == expect_calls, pieces
        assert (content or None) == whole.content, pieces
        assert all(len(v) == 1 for v in ids.values()), "one id per call, sent once"
        for c in calls:
            json.loads(c["arguments"])  # fragments concatenate to valid JSON


def test_builtin_tool_body_is_flushed_by_finish_streaming(tokenizer):
    """glm-4-9b-chat's built-in ``python`` tool writes a raw body, not JSON; it ends only
    with the output, so the last argument fragment comes from ``finish_streaming``."""
    req = request(tools=[{"type": "function", "function": {"name": "python"}}])
    out = "python\nprint('你好')\n"
    whole = plugin.GLMServeGLM4ToolParser(tokenizer, req.tools).extract_tool_calls(out, req)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls] == \
        [("python", {"input": "print('你好')\n"})]
    content, calls, _ = stream(plugin.GLMServeGLM4ToolParser, tokenizer, req, list(out))
    assert calls == [{"name": "python", "arguments": whole.tool_calls[0].function.arguments}] and not content


def test_streaming_reads_only_the_delta(tokenizer):
    """vLLM hands engine-based parsers deltas; the plugin must not depend on the rest."""
    req = request()
    out = OUTPUTS[1]
    a = stream(plugin.GLMServeGLM4ToolParser, tokenizer, req, list(out))
    b = stream(plugin.GLMServeGLM4ToolParser, tokenizer, req, list(out), garble_context=True)
    assert a[:2] == b[:2]


def test_streaming_is_linear_in_output_size(tokenizer):
    """A 64K-character argument fed one character per delta: quadratic re-parsing would take minutes."""
    req = request(tools=[{"type": "function", "function": {"name": "write", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}}}}])
    body = "字a\\\"{}[]" * 8000
    out = 'write\n{"text": "' + body + '"}'
    p = plugin.GLMServeGLM4ToolParser(tokenizer, req.tools)
    t0 = time.perf_counter()
    total = ""
    for ch in out:
        d = p.extract_tool_calls_streaming("", "", ch, [], [], [], req)
        if d is not None:
            total += "".join(tc.function.arguments or "" for tc in d.tool_calls if tc.function)
    elapsed = time.perf_counter() - t0
    assert json.loads(total) == {"text": json.loads('"' + body + '"')}
    assert elapsed < 20, f"{len(out)} one-character deltas took {elapsed:.1f}s"


# --------------------------------------------------------------------------- adjust_request


def _chat(choice, tools=TOOLS):
    return ChatRequest(messages=[], tools=[Tool.from_openai(t) for t in tools], tool_choice=choice)


def test_adjust_request_constrains_required_and_named_with_glmserves_grammar(tokenizer):
    import xgrammar as xg

    fmt = get_format("glm4")
    for choice, chat_choice in [("required", "required"),
                                ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
                                ("auto", "auto")]:
        req = request(tool_choice=choice, response_format={"type": "text"} if choice == "auto" else None)
        out = plugin.GLMServeGLM4ToolParser(tokenizer, req.tools).adjust_request(req)
        assert out.skip_special_tokens is False
        assert out.response_format is None or out.response_format.type == "text"
        assert out.structured_outputs.grammar == fmt.constraint(_chat(chat_choice)).grammar
        xg.Grammar.from_ebnf(out.structured_outputs.grammar)  # compiles
    named = request(tool_choice={"type": "function", "function": {"name": "get_time"}})
    g = plugin.GLMServeGLM4ToolParser(tokenizer, named.tools).adjust_request(named).structured_outputs.grammar
    assert "get_time" in g and "get_weather" not in g


def test_adjust_request_leaves_clients_constraint_in_auto_and_none(tokenizer):
    req = request(tool_choice="auto", response_format={"type": "json_object"})
    out = plugin.GLMServeGLM4ToolParser(tokenizer, req.tools).adjust_request(req)
    assert out.structured_outputs is None and out.response_format.type == "json_object"
    req = request(tool_choice="none")
    out = plugin.GLMServeGLM4ToolParser(tokenizer, req.tools).adjust_request(req)
    assert out.structured_outputs is None
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert plugin.GLMServeGLM4ToolParser(tokenizer, None).adjust_request(req).structured_outputs is None


# --------------------------------------------------------------------------- the template


def test_template_renders_the_reference_glm4_prompts(tokenizer):
    """glmserve/templates/glm4_tools.jinja, fed what vLLM feeds a template (tool model_dump, arguments
    parsed to dicts), gives the reference glm-4-9b-chat prompts byte for byte."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
    from vllm.renderers.chat_utils import _postprocess_messages

    template = TEMPLATE.read_text(encoding="utf-8")
    cases = [c for c in load_jsonl("glm-prompts.jsonl") if c["family"] == "glm4-9b-chat"]
    assert cases
    for case in cases:
        req = case["request"]
        tools = [ChatCompletionToolsParam.model_validate(t).model_dump() for t in req.get("tools") or []] or None
        messages = json.loads(json.dumps(req["messages"]))
        _postprocess_messages(messages)
        got = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                            add_generation_prompt=True)
        assert got == case["expected_prompt"], case["case"]
        # and it is what glmserve's own glm4 format renders
        chat = ChatRequest(messages=req["messages"], tools=[Tool.from_openai(t) for t in req.get("tools") or []])
        assert get_format("glm4").render(chat).text == got, case["case"]


# --------------------------------------------------------------------------- vLLM's own server


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server():
    from tiny_models import build_tiny

    model = str(build_tiny("glm4"))
    port = _free_port()
    fd, log_name = tempfile.mkstemp(prefix="vllm-plugin-test-", suffix=".log")
    os.close(fd)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "tiny-glm4", "--host", "127.0.0.1", "--port", str(port),
           "--enable-auto-tool-choice", "--tool-parser-plugin", PLUGIN_PATH, "--tool-call-parser", "glmserve-glm4",
           "--chat-template", str(TEMPLATE), "--enforce-eager", "--max-model-len", "2048",
           "--gpu-memory-utilization", "0.5"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_name, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log = Path(log_name)
    deadline = time.monotonic() + float(os.environ.get("GLMSERVE_TEST_START_TIMEOUT", "420"))
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log.read_text(errors='replace')[-6000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start:\n{log.read_text(errors='replace')[-6000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# Enum-only schemas: with random weights a free string never ends within max_tokens.
E2E_WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["北京", "上海"]},
                   "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
E2E_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": E2E_WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}},
]
E2E_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in E2E_TOOLS}


def _streamed_calls(chunks):
    ids, calls = {}, {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            if tc.id:
                ids.setdefault(tc.index, set()).add(tc.id)
            slot = calls.setdefault(tc.index, ["", ""])
            if tc.function and tc.function.name:
                slot[0] += tc.function.name
            slot[1] += (tc.function.arguments or "") if tc.function else ""
    return ids, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.e2e
def test_vllm_serve_with_the_plugin(vllm_server):
    """vLLM's own server, ``--tool-call-parser glmserve-glm4``: required, named and streamed
    calls come back parsed by the plugin.  Evidence that the plugin (not vLLM's JSON path)
    produced them: the ids are glmserve's ``call_<24 hex>`` (vLLM's own are
    ``chatcmpl-tool-...``), and the arguments follow the schema (vLLM's own required path
    returned a JSON string of random words for this model)."""
    import openai

    base_url, log = vllm_server
    c = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "北京天气怎么样？"}]

    def check(call):
        assert call.id.startswith("call_") and len(call.id) == 29, call.id
        jsonschema.validate(json.loads(call.function.arguments), E2E_SCHEMAS[call.function.name])

    for parallel in (False, True):
        r = c.chat.completions.create(model="tiny-glm4", messages=msgs, tools=E2E_TOOLS, tool_choice="required",
                                      temperature=0, max_tokens=64, parallel_tool_calls=parallel)
        calls = r.choices[0].message.tool_calls
        assert calls and r.choices[0].finish_reason == "tool_calls", r.model_dump()
        for call in calls:
            check(call)
        assert not r.choices[0].message.content  # the call text is not left in content
    required = [(x.function.name, x.function.arguments) for x in calls]

    ids, streamed = _streamed_calls(c.chat.completions.create(
        model="tiny-glm4", messages=msgs, tools=E2E_TOOLS, tool_choice="required", temperature=0, max_tokens=64,
        stream=True))
    assert streamed == required  # greedy: the same calls, arguments fragments concatenate to the same text
    assert all(len(v) == 1 and next(iter(v)).startswith("call_") for v in ids.values())

    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="tiny-glm4", messages=msgs, tools=E2E_TOOLS, tool_choice=named,
                                  temperature=0, max_tokens=64)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    check(call)
    ids, streamed = _streamed_calls(c.chat.completions.create(
        model="tiny-glm4", messages=msgs, tools=E2E_TOOLS, tool_choice=named, temperature=0, max_tokens=64,
        stream=True))
    assert streamed == [("get_weather", call.function.arguments)]

    # auto: the grammar lets the random model answer in text; the plugin strips the
    # empty metadata line "\n" that starts a GLM-4 text answer
    r = c.chat.completions.create(model="tiny-glm4", messages=msgs, tools=E2E_TOOLS, temperature=0, max_tokens=16)
    m = r.choices[0].message
    assert m.tool_calls or (m.content and not m.content.startswith("\n"))

    # the tool result goes back through the template, and the model answers
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "晴，25 度"}]
    r = c.chat.completions.create(model="tiny-glm4", messages=follow, tools=E2E_TOOLS, tool_choice="none",
                                  temperature=0, max_tokens=8)
    assert r.choices[0].message.role == "assistant" and not r.choices[0].message.tool_calls
    assert r.usage.prompt_tokens > 100  # tools block + call + result all rendered by the template
