"""``glmserve chat``: the interactive terminal client.

Unit tests drive :class:`glmserve.chat_cli.Chat` with a scripted fake client (what is sent,
what is printed); the end-to-end test pipes a session into ``python -m glmserve chat``
against the embedded default server and reads the transcript.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys

import jsonschema
import pytest
from openai.types.chat import ChatCompletionChunk

from glmserve.chat_cli import Chat, _base_url, _load_tools, main

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Beijing", "Shanghai"]},
                   "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city",
                                           "parameters": WEATHER_PARAMS}}]


# --------------------------------------------------------------------------- with a fake server


def _chunk(delta: dict, finish=None) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate({
        "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _text_reply(*pieces: str):
    return [_chunk({"role": "assistant", "content": ""})] + [_chunk({"content": p}) for p in pieces] + \
        [_chunk({}, "stop")]


def _call_reply(name: str, *fragments: str, cid: str = "call_abc"):
    return [_chunk({"role": "assistant", "content": ""}),
            _chunk({"tool_calls": [{"index": 0, "id": cid, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})] + \
        [_chunk({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}) for f in fragments] + \
        [_chunk({}, "tool_calls")]


class FakeClient:
    def __init__(self, replies):
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.chat = self
        self.completions = self

    def create(self, **kw):
        self.requests.append(json.loads(json.dumps(kw)))  # a snapshot of what was sent
        return iter(self.replies.pop(0))


def _args(**kw):
    base = dict(tool_choice=None, followup_tool_choice="auto", system=None, max_tokens=None, temperature=None,
                seed=None)
    return argparse.Namespace(**{**base, **kw})


def _run(replies, stdin_text, tools=(), **kw):
    client = FakeClient(replies)
    out = io.StringIO()
    chat = Chat(client, "m", _args(**kw), list(tools), io.StringIO(stdin_text), out)
    rc = chat.run()
    return rc, out.getvalue(), client.requests


def test_streams_text_and_keeps_history():
    rc, out, reqs = _run([_text_reply("你", "好"), _text_reply("again")], "hello\nmore\n/quit\n", system="Be brief.")
    assert rc == 0
    assert "you> hello\nassistant> 你好\n" in out and "you> more\nassistant> again\n" in out
    assert reqs[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert reqs[1]["messages"][-3:] == [{"role": "user", "content": "hello"},
                                        {"role": "assistant", "content": "你好"}, {"role": "user", "content": "more"}]
    assert all(r["stream"] is True and r["model"] == "m" and "tools" not in r for r in reqs)


def test_tool_call_prompts_for_result_and_continues():
    replies = [_call_reply("get_weather", '{"city": ', '"Beijing", "unit": "c"}'), _text_reply("Sunny.")]
    rc, out, reqs = _run(replies, "weather?\n晴 25\n/quit\n", tools=TOOLS, tool_choice="required",
                         followup_tool_choice="none", max_tokens=20, temperature=0.0)
    assert rc == 0
    # the call is shown as it streams: name first, then the argument fragments
    assert 'you> weather?\nassistant> [tool call 1] get_weather({"city": "Beijing", "unit": "c"})\n' in out
    assert "result of get_weather [call_abc]> 晴 25\nassistant> Sunny.\n" in out
    assert reqs[0]["tool_choice"] == "required" and reqs[1]["tool_choice"] == "none"
    assert reqs[0]["max_tokens"] == 20 and reqs[0]["temperature"] == 0.0 and reqs[0]["tools"] == TOOLS
    assert reqs[1]["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Beijing", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "晴 25"},
    ]


def test_named_tool_choice_and_reset():
    replies = [_call_reply("get_weather", "{}"), _text_reply("ok"), _text_reply("fresh")]
    rc, out, reqs = _run(replies, "a\nres\n/reset\nb\n", tools=TOOLS, tool_choice="get_weather", system="S")
    assert rc == 0  # end of input ends the session
    assert reqs[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert reqs[1]["tool_choice"] == "auto"
    assert "[conversation reset]" in out
    assert reqs[2]["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "b"}]


def test_end_of_input_or_quit_while_asking_for_a_result():
    rc, out, reqs = _run([_call_reply("get_weather", "{}")], "go\n", tools=TOOLS)
    assert rc == 0 and len(reqs) == 1 and "result of get_weather" in out
    rc, out, reqs = _run([_call_reply("get_weather", "{}")], "go\n/quit\nnever read\n", tools=TOOLS)
    assert rc == 0 and len(reqs) == 1 and "never read" not in out


def test_reset_at_a_result_prompt():
    rc, out, reqs = _run([_call_reply("get_weather", "{}"), _text_reply("hi")], "go\n/reset\nnew\n", tools=TOOLS)
    assert rc == 0 and "[conversation reset]" in out
    assert reqs[1]["messages"] == [{"role": "user", "content": "new"}]


def test_two_streamed_calls_and_text():
    reply = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Checking."}),
             _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": '{"city": "Beijing"'}}]}),
             _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ', "unit": "c"}'}}]}),
             _chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]}),
             _chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Shanghai", "unit": "f"}'}}]}),
             _chunk({}, "tool_calls")]
    rc, out, reqs = _run([reply, _text_reply("done")], "go\nr1\nr2\n", tools=TOOLS, followup_tool_choice="none")
    assert ("assistant> Checking.\n"
            'assistant> [tool call 1] get_weather({"city": "Beijing", "unit": "c"})\n'
            'assistant> [tool call 2] get_weather({"city": "Shanghai", "unit": "f"})\n'
            "result of get_weather [call_1]> r1\nresult of get_weather [call_2]> r2\nassistant> done\n") in out
    assert [m.get("tool_call_id") for m in reqs[1]["messages"][-2:]] == ["call_1", "call_2"]
    assert reqs[1]["messages"][1]["content"] == "Checking."


def test_call_cut_off_by_max_tokens_is_not_run():
    reply = _call_reply("get_weather", '{"city": "Bei')
    reply[-1] = _chunk({}, "length")
    rc, out, reqs = _run([reply, _text_reply("next")], "go\nagain\n", tools=TOOLS)
    assert rc == 0 and "[tool call 1 was cut off; it is not run]" in out and "result of" not in out
    assert reqs[1]["messages"][1] == {"role": "assistant", "content": None}


def test_api_error_drops_the_failed_turn(capsys):
    import httpx
    import openai

    class Failing(FakeClient):
        def create(self, **kw):
            if not self.requests:
                self.requests.append(kw)
                response = httpx.Response(400, request=httpx.Request("POST", "http://x"))
                raise openai.BadRequestError("bad", response=response, body={
                    "message": "the prompt is too long", "type": "invalid_request_error"})
            return super().create(**kw)

    client = Failing([_text_reply("fine")])
    out = io.StringIO()
    rc = Chat(client, "m", _args(), [], io.StringIO("x\ny\n/quit\n"), out).run()
    assert rc == 0
    assert "the prompt is too long" in capsys.readouterr().err
    assert client.requests[-1]["messages"] == [{"role": "user", "content": "y"}]


def test_options_are_checked_before_connecting(tmp_path, capsys):
    bad = tmp_path / "tools.json"
    bad.write_text('{"tools": [{"type": "function", "function": {}}]}')
    assert main(["--tools", str(bad)]) == 2
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"tools": TOOLS}))
    assert _load_tools(str(good)) == TOOLS
    assert main(["--tools", str(good), "--tool-choice", "nope"]) == 2
    assert "not one of the tools" in capsys.readouterr().err
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([TOOLS[0]["function"]]))
    assert _load_tools(str(bare)) == TOOLS
    assert _base_url("http://h:1/") == "http://h:1/v1" and _base_url("http://h:1/v1") == "http://h:1/v1"


# --------------------------------------------------------------------------- against the real server


@pytest.mark.e2e
def test_piped_session_against_default_server(default_server, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    session = "What is the weather in Beijing?\n晴，25 度\n/reset\n/quit\n"
    p = subprocess.run(
        [sys.executable, "-m", "glmserve", "chat", "--url", default_server.url, "--tools", str(tools),
         "--tool-choice", "required", "--no-parallel-tool-calls", "--followup-tool-choice", "none",
         "--max-tokens", "64", "--temperature", "0",
         "--system", "You are a helpful assistant."],
        input=session, capture_output=True, text=True, timeout=300)
    out = p.stdout
    assert p.returncode == 0, p.stderr[-3000:] + out
    assert out.startswith("[SmolLM2-135M-Instruct at ")
    m = re.search(r"you> What is the weather in Beijing\?\nassistant> \[tool call 1\] get_weather\((.*)\)\n", out)
    assert m, out
    assert "[tool call 2]" not in out  # --no-parallel-tool-calls
    jsonschema.validate(json.loads(m.group(1)), WEATHER_PARAMS)
    call_line = re.search(r"result of get_weather \[(call_[0-9a-f]+)\]> 晴，25 度\n", out)
    assert call_line, out
    # the follow-up answer: an assistant line with text after the tool result
    rest = out[call_line.end():]
    assert rest.startswith("assistant> ")
    answer = rest[len("assistant> "):].split("\n[conversation reset]")[0].strip()
    assert answer and "[tool call" not in answer
    assert "[conversation reset]" in out and out.rstrip().endswith("you> /quit")
