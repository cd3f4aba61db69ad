"""Claude Code itself (``claude -p``, npm ``@anthropic-ai/claude-code`` pinned in
scripts/setup.sh) against glmserve's ``/v1/messages``.

1. A tool loop on a scripted engine: the model's output is scripted, Claude Code receives a
   ``Write`` call, executes it, sends the ``tool_result`` and finishes on the scripted answer.
2. The real engine: a tiny GLM whose weights make EOS the only likely token (``glm45-eos``),
   with a context that holds Claude Code's ~15K-token prompt; a turn completes with exit 0.
3. A whole agent session on a scripted engine (ToolSearch and an MCP tool, an image, a subagent,
   Read + Edit).
4. A parallel turn (a slow Bash, a fast Read) whose results Claude Code sends in the order the
   tools finished: the prompt shows them in call order.

Skipped only where node is absent; where node exists, a missing ``claude`` is a failure
(run scripts/setup.sh).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

CLAUDE = Path(sys.prefix) / "claude-code" / "node_modules" / ".bin" / "claude"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (Claude Code needs npm)")


def run_claude(base_url: str, key: str, model: str, prompt: str, cwd: Path, *args: str,
               timeout: float = 120, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    assert CLAUDE.exists(), f"{CLAUDE} is missing: run scripts/setup.sh (it installs Claude Code where npm exists)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE"))}
    env.update({
        "HOME": str(cwd.parent / "home"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        **(env_extra or {}),
    })
    (cwd.parent / "home").mkdir(exist_ok=True)
    return subprocess.run([str(CLAUDE), "-p", prompt, "--model", model, *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def test_claude_code_tool_loop_on_scripted_engine(tmp_path: Path) -> None:
    from anthropic_scripted import ScriptedServer, xml_call

    from glmserve.api.settings import Settings

    work = tmp_path / "work"
    work.mkdir()
    target = work / "hello.txt"
    seen: list[str] = []

    def script(prompt: str) -> str:
        seen.append(prompt)
        if "<tool_response>" in prompt:
            return "<think>The file is written.</think>\nDone: hello.txt holds the greeting."
        return ("<think>I will write the file with the Write tool.</think>\n"
                + xml_call("Write", {"file_path": str(target), "content": "hello from glm\n"}))

    s = ScriptedServer(Settings(api_keys=["cc-key"]), max_model_len=400_000, model="glm-scripted")
    try:
        s.output = script
        r = run_claude(s.url, "cc-key", "glm-scripted", "Write hello.txt saying hello.", work,
                       "--allowedTools", "Write")
    finally:
        s.stop()
    assert r.returncode == 0, f"stdout={r.stdout!r}\nstderr={r.stderr[-3000:]!r}"
    assert target.read_text() == "hello from glm\n"
    assert "Done: hello.txt holds the greeting." in r.stdout
    assert len(seen) == 2 and "<tool_response>" in seen[1]


def test_claude_code_through_vllm_router(tmp_path: Path) -> None:
    """The README's recipe with Claude Code itself: two replicas behind vllm-router with
    ``--api-key`` (its transparent proxy drops Claude Code's ``x-api-key``) and
    ``sticky_least_loaded``; Claude Code sends its session's ``X-Session-ID`` through
    ``ANTHROPIC_CUSTOM_HEADERS``, so both turns of its tool loop land on one replica."""
    from anthropic_scripted import ScriptedServer, xml_call
    from router import VllmRouter

    from glmserve.api.settings import Settings

    work = tmp_path / "work"
    work.mkdir()
    target = work / "hello.txt"
    seen: dict[int, list[str]] = {0: [], 1: []}

    def script(replica: int):
        def answer(prompt: str) -> str:
            seen[replica].append(prompt)
            if "<tool_response>" in prompt:
                return "<think>The file is written.</think>\nDone: hello.txt holds the greeting."
            return ("<think>I will write the file with the Write tool.</think>\n"
                    + xml_call("Write", {"file_path": str(target), "content": "hello from glm\n"}))
        return answer

    servers = [ScriptedServer(Settings(api_keys=["cc-key"]), max_model_len=400_000, model="glm-scripted") for _ in range(2)]
    try:
        for i, s in enumerate(servers):
            s.output = script(i)
        with VllmRouter([s.url for s in servers], "sticky_least_loaded", "--api-key", "cc-key") as router:
            r = run_claude(router.url, "cc-key", "glm-scripted", "Write hello.txt saying hello.", work,
                           "--allowedTools", "Write", env_extra={"ANTHROPIC_CUSTOM_HEADERS": "X-Session-ID: cc-session-1"})
    finally:
        for s in servers:
            s.stop()
    assert r.returncode == 0, f"stdout={r.stdout!r}\nstderr={r.stderr[-3000:]!r}"
    assert target.read_text() == "hello from glm\n"
    assert "Done: hello.txt holds the greeting." in r.stdout
    assert sorted(len(p) for p in seen.values()) == [0, 2], seen  # one replica served the whole session
    assert "<tool_response>" in max(seen.values(), key=len)[1]


@pytest.mark.e2e
def test_claude_code_turn_on_real_engine(tmp_path: Path) -> None:
    from servers import start_server
    from tiny_models import build_tiny

    server = start_server(str(build_tiny("glm45-eos")), "--chat-format", "glm45", "--served-model-name", "glm-eos",
                          api_key="cc-key", max_model_len=32768)
    try:
        work = tmp_path / "work"
        work.mkdir()
        r = run_claude(server.url, "cc-key", "glm-eos", "say hi", work, timeout=240)
        log = server.log()
    finally:
        server.stop()
    assert r.returncode == 0, f"stdout={r.stdout!r}\nstderr={r.stderr[-3000:]!r}\nserver log:\n{log[-3000:]}"
    assert "messages msg_" in log and "status=200" in log


MCP_SERVER = '''
from mcp.server.mcpserver import MCPServer

server = MCPServer("probe")


@server.tool()
def lookup_secret(key: str) -> str:
    """Look up the secret stored under a key in the probe vault."""
    return f"the secret under {key} is glm-4711"


server.run()
'''
MCP_TOOL = "mcp__probe__lookup_secret"
MCP_DESCRIPTION = "Look up the secret stored under a key in the probe vault."
SUBAGENT_TASK = "SUBAGENT-TASK: reply with the word ready."


def test_claude_code_agent_session_on_scripted_engine(tmp_path: Path) -> None:
    """One Claude Code session through everything an agent does that a text-only GLM server
    must survive: ``ToolSearch`` loads a deferred MCP tool (a ``tool_reference`` result), the
    MCP tool runs, ``Read`` of a PNG (an image in a ``tool_result``: glmserve's note), an
    ``Agent`` subagent with ``"model": "haiku"`` (requests named ``claude-haiku-…``, served
    through ``--model-alias``), ``Read`` + ``Edit`` of a file, the answer."""
    from PIL import Image

    from anthropic_scripted import ScriptedServer, xml_call

    from glmserve.api.settings import Settings

    work = tmp_path / "work"
    work.mkdir()
    png = work / "chart.png"
    Image.new("RGB", (16, 16), (20, 120, 220)).save(png)
    notes = work / "notes.txt"
    notes.write_text("status: draft\n")
    (tmp_path / "mcp_probe.py").write_text(MCP_SERVER)
    mcp_config = tmp_path / "mcp.json"
    mcp_config.write_text(json.dumps({"mcpServers": {"probe": {"command": sys.executable,
                                                               "args": [str(tmp_path / "mcp_probe.py")]}}}))
    prompts: list[str] = []

    def step(name: str, args: dict) -> str:
        return f"<think>Next: {name}.</think>\n" + xml_call(name, args)

    def script(prompt: str) -> str:
        prompts.append(prompt)
        if SUBAGENT_TASK in prompt and "<tool_call>Agent" not in prompt:  # the subagent's own turn
            return "<think>Easy.</think>\nSUBAGENT-READY"
        n = prompt.count("<tool_response>")
        steps = [
            ("ToolSearch", {"query": f"select:{MCP_TOOL}", "max_results": 5}),
            (MCP_TOOL, {"key": "alpha"}),
            ("Read", {"file_path": str(png)}),
            ("Agent", {"description": "Say ready", "prompt": SUBAGENT_TASK, "subagent_type": "general-purpose",
                       "model": "haiku"}),
            ("Read", {"file_path": str(notes)}),
            ("Edit", {"file_path": str(notes), "old_string": "draft", "new_string": "final"}),
        ]
        if n < len(steps):
            return step(*steps[n])
        secret = re.search(r"glm-\d+", prompt)
        image = "a note for image/png" if "An image was attached here (image/png" in prompt else "no note"
        sub = "ready" if "SUBAGENT-READY" in prompt else "silent"
        return (f"<think>All done.</think>\nFINISHED secret={secret.group(0) if secret else 'none'} image={image} "
                f"subagent={sub}")

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    req_log = logging.getLogger("glmserve.requests")
    req_log.addHandler(handler)
    old_level = req_log.level
    req_log.setLevel(logging.INFO)
    s = ScriptedServer(Settings(api_keys=["cc-key"], model_aliases=["claude-*"]), max_model_len=400_000,
                       model="glm-scripted")
    try:
        s.output = script
        r = run_claude(s.url, "cc-key", "glm-scripted", "Use the probe vault, look at chart.png, ask a helper, "
                       "then mark notes.txt final.", work, "--mcp-config", str(mcp_config), "--allowedTools",
                       f"ToolSearch,{MCP_TOOL},Read,Agent,Edit", timeout=300, env_extra={"ENABLE_TOOL_SEARCH": "true"})
        metrics = httpx.get(s.url + "/metrics").text
    finally:
        s.stop()
        req_log.removeHandler(handler)
        req_log.setLevel(old_level)
    where = f"stdout={r.stdout[-3000:]!r}\nstderr={r.stderr[-3000:]!r}\nrequests:\n" + "\n".join(records)
    assert r.returncode == 0, where
    assert notes.read_text() == "status: final\n", where  # Claude Code ran the Edit
    assert "FINISHED secret=glm-4711 image=a note for image/png subagent=ready" in r.stdout, where
    # the deferred MCP tool: not in the first prompt, its definition in the ToolSearch follow-up
    assert MCP_DESCRIPTION not in prompts[0], where
    follow_up = next(p for p in prompts if p.count("<tool_response>") == 1 and SUBAGENT_TASK not in p)
    assert MCP_DESCRIPTION in follow_up and MCP_TOOL in follow_up, where
    assert any("requested_model=claude-haiku" in line for line in records), where  # the subagent, aliased
    # exactly one 200 per model turn, and no other status anywhere
    statuses = re.findall(r'^glmserve_requests_total\{endpoint="([^"]+)",status="(\d+)"\} (\S+)', metrics, re.M)
    assert all(status == "200" for _, status, _ in statuses), statuses
    served = sum(float(v) for path, _, v in statuses if path == "/v1/messages")
    assert served == len(prompts) == len([line for line in records if line.startswith("messages ")]), (statuses, where)


def test_claude_code_parallel_tools_results_reach_the_model_in_call_order(tmp_path: Path, monkeypatch) -> None:
    """A parallel turn whose results Claude Code sends in the order the tools finished: the
    model calls a slow ``Bash`` (``sleep``) and then a fast ``Read`` in one turn; Claude Code
    runs both at once and sends the ``Read`` result first.  The prompt glmserve renders shows
    each result in its call's place (Bash's first), so the model is not shown Read's file as
    the output of its command."""
    from anthropic_scripted import ScriptedServer, xml_call

    from glmserve.api.anthropic import routes as anthropic_routes
    from glmserve.api.settings import Settings

    work = tmp_path / "work"
    work.mkdir()
    (work / "facts.txt").write_text("READ-RESULT: the file's own words\n")
    calls: list[str] = []  # the parallel turn's tool names, in call order, and its results' as sent
    sent: list[str] = []
    mapping = anthropic_routes.am.to_openai_messages

    def recording(system, messages, *args, **kw):  # type: ignore[no-untyped-def]
        blocks = [b for m in messages if isinstance(m.content, list) for b in m.content]
        names = {b.id: b.name for b in blocks if b.type == "tool_use"}
        if names:
            calls[:] = list(names.values())
            sent[:] = [names[b.tool_use_id] for b in blocks if b.type == "tool_result"]
        return mapping(system, messages, *args, **kw)

    monkeypatch.setattr(anthropic_routes.am, "to_openai_messages", recording)
    prompts: list[str] = []

    def script(prompt: str) -> str:
        prompts.append(prompt)
        if "<tool_response>" not in prompt:
            return ("<think>Both at once.</think>\n"
                    + xml_call("Bash", {"command": "sleep 2; echo BASH-RESULT", "description": "Slow command"})
                    + "\n" + xml_call("Read", {"file_path": str(work / "facts.txt")}))
        results = re.findall(r"<tool_response>(.*?)</tool_response>", prompt.rsplit("<|observation|>", 1)[1], re.S)
        order = ["bash" if "BASH-RESULT" in x else "read" if "READ-RESULT" in x else "?" for x in results]
        return f"<think>Results seen.</think>\nFINISHED order={','.join(order)}"

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    req_log = logging.getLogger("glmserve.requests")
    req_log.addHandler(handler)
    old_level = req_log.level
    req_log.setLevel(logging.INFO)
    s = ScriptedServer(Settings(api_keys=["cc-key"], model_aliases=["claude-*"]), max_model_len=400_000,
                       model="glm-scripted")
    try:
        s.output = script
        r = run_claude(s.url, "cc-key", "glm-scripted", "Run the slow command and read facts.txt.", work,
                       "--allowedTools", "Bash,Read", timeout=240)
        metrics = httpx.get(s.url + "/metrics").text
    finally:
        s.stop()
        req_log.removeHandler(handler)
        req_log.setLevel(old_level)
    where = f"sent={sent}\nstdout={r.stdout[-3000:]!r}\nstderr={r.stderr[-3000:]!r}\nrequests:\n" + "\n".join(records)
    assert r.returncode == 0, where
    assert len(prompts) == 2, where
    print(f"\nClaude Code called {calls} and sent their results as {sent}")
    # the case under test: the slow first call finished last, and its result came last
    assert calls == ["Bash", "Read"] and sent == ["Read", "Bash"], where
    # the call order, in the prompt of the second turn: Bash's call, then Read's
    turn, results = prompts[1].rsplit("<|assistant|>", 2)[1].split("<|observation|>")
    assert turn.index("<tool_call>Bash") < turn.index("<tool_call>Read"), where
    # and the results in that order: each where its call's result belongs
    assert results.index("BASH-RESULT") < results.index("READ-RESULT") and results.count("<tool_response>") == 2, where
    assert "FINISHED order=bash,read" in r.stdout, where
    statuses = re.findall(r'^glmserve_requests_total\{endpoint="([^"]+)",status="(\d+)"\} (\S+)', metrics, re.M)
    assert all(status == "200" for _, status, _ in statuses), statuses
    served = sum(float(v) for path, _, v in statuses if path == "/v1/messages")
    assert served == len(prompts) == len([line for line in records if line.startswith("messages ")]), (statuses, where)
