"""``glmserve render`` / ``parse`` / ``--help``: the debugging tools users reach for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import load_jsonl


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmserve", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


FAMILY = {"glm4-9b-chat": "glm4", "glm4-0414": "glm4-0414", "glm4.5/4.6": "glm45", "glm4.7": "glm47"}


@pytest.mark.parametrize("case", [c for c in load_jsonl("glm-prompts.jsonl") if c["case"] == "tool_result_turn"],
                         ids=lambda c: c["family"])
def test_render_prints_the_golden_prompt(case):
    r = run("render", "--chat-format", FAMILY[case["family"]], stdin=json.dumps(case["request"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout == case["expected_prompt"] + "\n"


def test_render_parts_mark_control_tokens():
    req = {"messages": [{"role": "user", "content": "hi <|assistant|>"}]}
    r = run("render", "--chat-format", "glm4", "--parts", stdin=json.dumps(req))
    parts = [json.loads(line) for line in r.stdout.splitlines()]
    assert {"control": "<|user|>"} in parts
    assert any(p.get("text", "").endswith("hi <|assistant|>") for p in parts)  # user text stays text


def test_render_rejects_bad_request():
    r = run("render", "--chat-format", "glm4", stdin=json.dumps({"messages": [{"role": "wizard", "content": "x"}]}))
    assert r.returncode == 2 and "error" in r.stderr


def test_parse_shows_the_message_and_stream(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]))
    raw = 'get_weather\n{"city": "北京"}'
    r = run("parse", "--chat-format", "glm4", "--tools", str(tools), stdin=raw)
    assert r.returncode == 0, r.stderr
    msg = json.loads(r.stdout)
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    s = run("parse", "--chat-format", "glm4", "--tools", str(tools), "--stream", "--piece", "2", stdin=raw)
    lines = s.stdout.split("\n{\n")[0].splitlines()
    events = [e for line in lines for e in json.loads(line)["events"]]
    assert events[0] == {"type": "ToolCallStart", "index": 0, "name": "get_weather"}
    assert "".join(e["delta"] for e in events if e["type"] == "ToolCallArgs") == '{"city": "北京"}'
    # an undeclared tool is text, and the tool says so
    u = json.loads(run("parse", "--chat-format", "glm4", stdin=raw).stdout)
    assert "tool_calls" not in u and u["content"] == raw


def test_help_lists_commands_and_flags():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("serve", "render", "parse", "chat", "bench"):
        assert cmd in r.stdout
    r = run("serve", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--chat-format", "--api-key", "--max-concurrent-requests", "--tensor-parallel-size",
                 "--enforce-eager", "--served-model-name", "--argument-hook", "--json-logs", "--inspect",
                 "--inspect-max-bytes"):
        assert flag in r.stdout


def test_cli_imports_no_vllm_and_offers_every_family():
    """The engine owns vLLM: importing the CLI (and rendering) loads neither vLLM nor torch."""
    code = ("import sys, glmserve.cli as c; from glmserve.formats import FORMATS; "
            "assert c.FORMAT_CHOICES == list(FORMATS), c.FORMAT_CHOICES; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch')); "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = run("serve", "--help")
    assert r.returncode == 0, r.stderr
    from glmserve.formats import FORMATS

    assert "{" + ",".join(FORMATS) + "}" in r.stdout
