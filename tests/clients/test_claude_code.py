"""Claude Code itself (``claude -p``, npm ``@anthropic-ai/claude-code`` pinned in
scripts/setup.sh) against glmserve's ``/v1/messages``.

1. A tool loop on a scripted engine: the model's output is scripted, Claude Code receives a
   ``Write`` call, executes it, sends the ``tool_result`` and finishes on the scripted answer.
2. The real engine: a tiny GLM whose weights make EOS the only likely token (``glm45-eos``),
   with a context that holds Claude Code's ~15K-token prompt; a turn completes with exit 0.

Skipped only where node is absent; where node exists, a missing ``claude`` is a failure
(run scripts/setup.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLAUDE = Path(sys.prefix) / "claude-code" / "node_modules" / ".bin" / "claude"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (Claude Code needs npm)")


def run_claude(base_url: str, key: str, model: str, prompt: str, cwd: Path, *args: str,
               timeout: float = 120) -> subprocess.CompletedProcess:
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
