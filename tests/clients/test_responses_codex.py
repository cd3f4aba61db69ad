"""Codex CLI itself (npm ``@openai/codex``, pinned in scripts/setup.sh) against glmserve.

``codex exec`` with a custom provider (``wire_api = "responses"``) pointed at a glmserve
whose model output is scripted (tests/scripted_server.py): Codex receives an
``exec_command`` call, runs it, sends its output back (with the first turn's reasoning as
``encrypted_content``, since Codex stores nothing server-side) and finishes on an answer
that quotes the output.  The real-engine turn is in tests/test_e2e_responses.py.

Skips only when node is absent; with node present a missing Codex is a failure (run
``bash scripts/setup.sh``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from codex_cli import codex_bin, run_codex
from servers import free_port

def test_codex_runs_a_command_and_finishes(tmp_path: Path) -> None:
    codex_bin()
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[1] / "scripted_server.py"), "--port", str(port), "--program", "codex",
         "--responses-db", str(tmp_path / "r.sqlite3"), "--api-key", "codex-key"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        work = tmp_path / "work"
        work.mkdir()
        # Codex's sandbox needs kernel features CI runners may lack; the command is the test's own.
        r = run_codex(f"http://127.0.0.1:{port}/v1", "codex-key", "scripted", "Write 6*7 into codex_out.txt", work,
                      120, "--dangerously-bypass-approvals-and-sandbox")
    finally:
        server.terminate()
        server.wait(10)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert (work / "codex_out.txt").read_text().strip() == "42"  # Codex ran the call
    # the answer quotes the command's output, so Codex sent it back; "kept": the first turn's
    # reasoning came back as glmserve-sealed encrypted_content and became reasoning history
    assert "The command printed 42; reasoning kept." in r.stdout, out
    assert "ERROR" not in out, out


def _scripted_codex_server(tmp_path: Path, program: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    log_path = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[1] / "scripted_server.py"), "--port", str(port), "--program", program,
         "--responses-db", str(tmp_path / "r.sqlite3"), "--api-key", "codex-key", "--log-requests"],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server, port, log_path
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError(log_path.read_text())
        time.sleep(0.2)


def test_codex_session_views_an_image_on_a_text_only_model(tmp_path: Path) -> None:
    """``exec_command`` -> ``view_image`` of a PNG -> the answer: the picture becomes glmserve's
    note (media type, size) instead of a 400 that would end the session."""
    codex_bin()
    work = tmp_path / "work"
    work.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(work / "shot.png")
    server, port, log_path = _scripted_codex_server(tmp_path, "codex-image")
    try:
        r = run_codex(f"http://127.0.0.1:{port}/v1", "codex-key", "scripted", "What does the picture here show?", work,
                      120, "--dangerously-bypass-approvals-and-sandbox")
    finally:
        server.terminate()
        server.wait(10)
    out = r.stdout + r.stderr
    log = log_path.read_text()
    assert r.returncode == 0, out + log
    answer = re.search(r"I was given a note for (image/\w+) of (\d+) bytes", r.stdout)
    assert answer is not None, out + log  # the view_image output reached the model, as a note
    assert answer.group(1) == "image/png"
    statuses = re.findall(r'"POST /v1/responses HTTP/1.1" (\d+)', log)
    turns = re.findall(r"^glmserve.requests: responses resp_\w+ status=200", log, re.M)
    assert statuses == ["200"] * 3 and len(turns) == 3, log  # one 200 per turn, no 4xx
    assert "media_replaced=1" in log and "ERROR" not in out, out + log


def test_codex_applies_patches_through_its_custom_apply_patch_tool(tmp_path: Path) -> None:
    """With a model catalog naming the served model, Codex declares ``apply_patch`` as a custom
    (freeform) tool with its Lark grammar.  The model's two calls (create notes.md, then edit it,
    Chinese text) come back as ``custom_tool_call`` items; Codex applies them and sends their
    outputs back as ``custom_tool_call_output``; the answer quotes the second one."""
    from scripted_server import PATCHED

    codex_bin()
    work = tmp_path / "work"
    work.mkdir()
    server, port, log_path = _scripted_codex_server(tmp_path, "codex-patch")
    try:
        r = run_codex(f"http://127.0.0.1:{port}/v1", "codex-key", "scripted", "Write notes.md, then edit it", work,
                      120, "--dangerously-bypass-approvals-and-sandbox", catalog=True)
    finally:
        server.terminate()
        server.wait(10)
    out = r.stdout + r.stderr
    log = log_path.read_text()
    assert r.returncode == 0, out + log
    assert (work / "notes.md").read_bytes() == PATCHED.encode()  # both patches applied, byte for byte
    assert "Codex said:" in r.stdout and "notes.md" in r.stdout.split("Codex said:")[-1], out
    assert "<tool_call>" not in r.stdout and "<arg_key>" not in r.stdout, out  # no raw call markup as the answer
    statuses = re.findall(r'"POST /v1/responses HTTP/1.1" (\d+)', log)
    turns = re.findall(r"^glmserve.requests: responses resp_\w+ status=200.*$", log, re.M)
    assert statuses == ["200"] * 3 and len(turns) == 3, log  # one 200 per turn, no retries
    assert sum("'apply_patch'" in t for t in turns) == 2, turns  # the two calls were the custom tool's
    assert "ERROR" not in out, out
