"""Coding-agent CLIs (OpenCode, Cline, Kilo Code, Qwen Code; npm packages pinned in
scripts/setup.sh, installed into the venv) driven through whole sessions against glmserve on a
scripted engine, for ``tests/clients/test_agent_clis.py``.

A session is the same four model turns for every CLI, in that CLI's own tool vocabulary:
read ``notes.md`` (Chinese text) -> edit a line of it -> run a shell command that hashes the
edited file -> answer, quoting what the tools returned (the owner named in the file the read
returned, the hash the shell printed), so the answer shows every tool result reached the model.
The model's turns are GLM-4.7 or GLM-4.5 output, chosen from the prompt: the number of
``<tool_response>`` blocks in it is the step reached.  Requests that declare no tools (OpenCode's
session title) get a title.

Each CLI runs offline: its telemetry, update checks and model catalogues switched off (the
switches are in each runner and the README), ``HOME`` a fresh directory, and every proxy variable
pointing at a :class:`Sinkhole` that records whatever a CLI tries to reach besides glmserve.
Skips only where node is absent; with node present a missing CLI is a failure (run
``bash scripts/setup.sh``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.engine.base import GenerateParams
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

KEY = "agent-key"
CLI_TIMEOUT = 420  # seconds for a whole session: node CLIs start slowly on two loaded cores

# ----------------------------------------------------------------------------- the CLIs


@dataclass(frozen=True)
class Cli:
    package: str
    version: str
    folder: str
    """Under the venv: ``$VENV/<folder>/node_modules/.bin/<bin>``."""
    bin: str

    def path(self) -> Path:
        if shutil.which("node") is None:
            pytest.skip("node is not installed, so the agent CLIs cannot run")
        p = Path(sys.prefix) / self.folder / "node_modules" / ".bin" / self.bin
        assert p.exists(), f"{self.package}@{self.version} not found at {p}: run `bash scripts/setup.sh`"
        return p


OPENCODE = Cli("opencode-ai", "1.18.33", "opencode", "opencode")
CLINE = Cli("cline", "3.0.65", "cline", "cline")
KILO = Cli("@kilocode/cli", "7.7.7", "kilo", "kilo")
QWEN = Cli("@qwen-code/qwen-code", "0.24.4", "qwen-code", "qwen")

# ----------------------------------------------------------------------------- the session

ORIGINAL = "# 周报\n\n状态：草稿\n负责人：张三\n备注：下周一前提交。\n"
OLD, NEW = "状态：草稿", "状态：已完成"
EDITED = ORIGINAL.replace(OLD, NEW)
SHELL = "sha256sum notes.md | tee notes.sha256"
TASK = "读取 notes.md，把状态改为已完成，再用 sha256sum 算出它的哈希，然后告诉我结果。"
"""Read notes.md, mark it done, hash it with sha256sum, then tell me the result."""
EDITED_SHA = hashlib.sha256(EDITED.encode()).hexdigest()
ANSWER = f"完成。负责人=张三 sha256={EDITED_SHA}"
"""The answer the program gives when every tool result came back as expected."""

Call = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Vocabulary:
    """One CLI's calls for the session's three steps."""

    read: Callable[[Path], Call]
    edit: Callable[[Path, str, str], Call]
    shell: Callable[[str], Call]


OPENCODE_TOOLS = Vocabulary(  # OpenCode and Kilo (a fork of it)
    read=lambda p: ("read", {"filePath": str(p)}),
    edit=lambda p, old, new: ("edit", {"filePath": str(p), "oldString": old, "newString": new}),
    shell=lambda cmd: ("bash", {"command": cmd, "description": "Hash notes.md"}),
)
CLINE_TOOLS = Vocabulary(
    read=lambda p: ("read_files", {"files": [{"path": str(p)}]}),
    edit=lambda p, old, new: ("editor", {"path": str(p), "old_text": old, "new_text": new}),
    shell=lambda cmd: ("run_commands", {"commands": [cmd]}),
)
QWEN_TOOLS = Vocabulary(
    read=lambda p: ("read_file", {"file_path": str(p)}),
    edit=lambda p, old, new: ("edit", {"file_path": str(p), "old_string": old, "new_string": new}),
    shell=lambda cmd: ("run_shell_command", {"command": cmd, "description": "Hash notes.md"}),
)


def glm_turn(fmt: str, prompt: str, reasoning: str, call: Call | None = None, text: str = "") -> str:
    """One model turn as GLM-4.7 (``glm47``) or GLM-4.5 (``glm45``) writes it: reasoning, then a
    call or text.  GLM-4.7's prompt opens the reasoning (``<think>``) unless thinking is off."""
    nl = "\n" if fmt == "glm45" else ""
    if call is not None:
        name, args = call
        body = "".join(f"<arg_key>{k}</arg_key>{nl}<arg_value>{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
                       f"</arg_value>{nl}" for k, v in args.items())
        text = f"<tool_call>{name}{nl}{body}</tool_call>"
    if prompt.endswith("<think>"):
        return f"{reasoning}</think>{text}"
    if prompt.endswith("</think>"):  # thinking off
        return text
    return f"<think>{reasoning}</think>{nl}{text}"


class SessionProgram:
    """The scripted model of one session: ``(prompt, params) -> output pieces``."""

    def __init__(self, fmt: str, tools: Vocabulary, notes: Path) -> None:
        self.fmt, self.tools, self.notes = fmt, tools, notes
        self.turns: list[tuple[str, GenerateParams]] = []
        """The session's model turns (requests that declare tools): prompt and params."""
        self.side: list[str] = []
        """Prompts of requests that declare no tools (a session title)."""

    def __call__(self, prompt: str, params: GenerateParams) -> list[str]:
        if "<tools>" not in prompt:
            self.side.append(prompt)
            return pieces(glm_turn(self.fmt, prompt, "A title.", text="周报状态更新"))
        if self.turns and prompt.startswith(self.turns[-1][0]) and prompt.endswith("</think>"):
            pass  # a thinking budget's second engine request: the same turn, continued after the reasoning
        else:
            self.turns.append((prompt, params))
        results = re.findall(r"<tool_response>(.*?)</tool_response>", prompt, re.S)
        steps = [self.tools.read(self.notes), self.tools.edit(self.notes, OLD, NEW), self.tools.shell(SHELL)]
        if len(results) < len(steps):
            return pieces(glm_turn(self.fmt, prompt, f"Step {len(results) + 1}.", call=steps[len(results)]))
        owner = re.search(r"负责人：([^\s\\]+)", results[0])  # a result may be JSON text (Cline): stop at an escape
        digest = re.search(r"\b[0-9a-f]{64}\b", results[2])
        return pieces(glm_turn(self.fmt, prompt, "All done.", text=f"完成。负责人={owner.group(1) if owner else '?'} "
                                                                       f"sha256={digest.group(0) if digest else '?'}"))


def pieces(text: str, size: int = 4) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


# ----------------------------------------------------------------------------- the server


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    body: dict[str, Any] = field(default_factory=dict)


class SessionServer(ThreadServer):
    """glmserve (the real app, one chat format) on a scripted engine whose program a test sets
    per session; it records every HTTP exchange and every request-log line."""

    def __init__(self, fmt: str, model: str) -> None:
        self.fmt, self.model = fmt, model
        self.program: Callable[[str, GenerateParams], list[str]] = lambda prompt, params: []
        self.engine = ScriptedEngine(lambda prompt, params: self.program(prompt, params), model_name=model)
        self.exchanges: list[Exchange] = []
        self.log: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: self.log.append(record.getMessage())  # type: ignore[method-assign]
        self._handler = handler
        self._logger = logging.getLogger("glmserve.requests")
        self._level = self._logger.level
        self._logger.addHandler(handler)
        self._logger.setLevel(logging.INFO)
        app = create_app(self.engine, get_format(fmt), Settings(api_keys=[KEY]))
        super().__init__(self._recording(app))

    def _recording(self, app: Any) -> Any:
        async def recorded(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            body = bytearray()

            async def receive_body() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    body.extend(message.get("body", b""))
                return message

            async def send_status(message: dict) -> None:
                if message["type"] == "http.response.start":
                    try:
                        parsed = json.loads(body) if body else {}
                    except ValueError:
                        parsed = {}
                    self.exchanges.append(Exchange(scope["method"], scope["path"], message["status"],
                                                   parsed if isinstance(parsed, dict) else {}))
                await send(message)

            await app(scope, receive_body, send_status)
        return recorded

    def start_session(self, program: SessionProgram, max_model_len: int) -> None:
        self.program, self.engine.max_model_len = program, max_model_len
        self.exchanges.clear()
        self.log.clear()

    def stop(self) -> None:
        super().stop()
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)


class Sinkhole(socketserver.ThreadingTCPServer):
    """An HTTP proxy that forwards nothing: every proxy variable of a CLI points here, and the
    first line of each request (``CONNECT host:443``...) is recorded and answered 403."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.seen: list[str] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.connection.settimeout(5)
                try:
                    line = self.rfile.readline(4096).decode("latin-1").strip()
                except OSError:
                    line = "(no request line)"
                outer.seen.append(line)
                try:
                    self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# ----------------------------------------------------------------------------- running a CLI


@dataclass
class Run:
    """A finished CLI session and what the server saw of it."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    exchanges: list[Exchange]
    log: list[str]
    program: SessionProgram
    outside: list[str]
    """Requests that went anywhere but glmserve (through the sinkhole proxy)."""
    left: list[str]
    """Processes the session left running (a daemon it started), killed once found."""

    def where(self) -> str:
        lines = [f"exit {self.returncode} after {self.seconds:.1f}s", "stdout: " + self.stdout[-3000:],
                 "stderr: " + self.stderr[-3000:], "exchanges:"]
        lines += [f"  {e.method} {e.path} {e.status} max_tokens={e.body.get('max_tokens')}" for e in self.exchanges]
        if self.program.turns:
            results = re.findall(r"<tool_response>(.*?)</tool_response>", self.program.turns[-1][0], re.S)
            lines += ["tool results the model saw last:", *(f"  {r[:600]!r}" for r in results)]
        return "\n".join(lines + ["request log:", *self.log, f"outside: {self.outside}", f"left running: {self.left}"])


def offline_env(home: Path, sinkhole: Sinkhole, extra: dict[str, str]) -> dict[str, str]:
    """The environment of a CLI run: a fresh HOME, no inherited provider keys or XDG dirs, every
    proxy variable pointing at the sinkhole (glmserve itself on loopback bypasses it)."""
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "TERM", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"HOME": str(home), "NO_COLOR": "1", "CI": "1", "LANG": env.get("LANG", "C.UTF-8")})
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[var] = env[var.lower()] = sinkhole.url
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def run_session(server: SessionServer, tools: Vocabulary, tmp: Path, max_model_len: int,
                setup: Callable[[Path, Path, str], tuple[list[list[str]], dict[str, str]]]) -> Run:
    """One session of a CLI: ``setup(home, work, base_url) -> (commands, env)`` writes the CLI's
    configuration and says what to run (every command but the last prepares, e.g. ``cline auth``);
    the last command is the session, run in ``work`` with ``notes.md`` in it."""
    home, work = tmp / "home", tmp / "work"
    home.mkdir()
    work.mkdir()
    notes = work / "notes.md"
    notes.write_bytes(ORIGINAL.encode())
    program = SessionProgram(server.fmt, tools, notes)
    server.start_session(program, max_model_len)
    sinkhole = Sinkhole()
    t0 = time.monotonic()
    try:
        commands, extra = setup(home, work, server.url)
        env = offline_env(home, sinkhole, extra)
        for cmd in commands[:-1]:
            subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=CLI_TIMEOUT, check=True)
        r = subprocess.run(commands[-1], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=CLI_TIMEOUT)
    finally:  # whatever happened, nothing the session started outlives it
        sinkhole.stop()
        left = left_running(tmp)
    return Run(r.returncode, r.stdout, r.stderr, time.monotonic() - t0, list(server.exchanges), list(server.log),
               program, list(sinkhole.seen), left)


def left_running(tmp: Path) -> list[str]:
    """The command lines of processes still running in or on the session's directory once its CLI
    exited (a hub or daemon it started detached), each killed by its pid."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(tmp) in cmdline or (proc.info["cwd"] or "").startswith(str(tmp)):
            found.append(cmdline)
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    return found


def check_session(run: Run, endpoint: str, notes: Path, context: int, asks_budget: bool) -> None:
    """What every session must show: exit 0, the file edited byte-exact and the shell's output
    written, the answer quoting every tool result, exactly one 200 per model turn and nothing
    else on the wire (no retry, no 4xx, nothing outside, no process left running), every request
    granted what it asked at most the room its prompt left in the served ``context`` -- and, for
    a CLI that ``asks_budget`` (a fixed ``max_tokens``), every model turn asked for more than
    that room and was granted the room: the session ran on the clamp."""
    where = run.where()
    assert run.returncode == 0, where
    assert notes.read_bytes() == EDITED.encode(), where
    assert (notes.parent / "notes.sha256").read_bytes() == f"{EDITED_SHA}  notes.md\n".encode(), where
    assert ANSWER in run.stdout, where
    turns, side = run.program.turns, run.program.side
    assert [len(re.findall("<tool_response>", p)) for p, _ in turns] == [0, 1, 2, 3], where
    assert [(e.method, e.path, e.status) for e in run.exchanges] == [("POST", endpoint, 200)] * (len(turns) + len(side)), where
    assert len(run.log) == len(run.exchanges) and all(" status=200 " in line for line in run.log), where
    assert run.outside == [] and run.left == [], where
    clamped = 0
    for line in run.log:  # the budget granted: what was asked, at most the room the prompt left
        prompt_tokens, granted = re.search(r" prompt_tokens=(\d+) .* max_tokens=(\d+)", line).groups()
        room = context - int(prompt_tokens)
        if "max_tokens_asked=" in line:
            clamped += 1
            assert int(granted) == room, where
        else:
            assert int(granted) <= room, where
    assert clamped >= (len(turns) if asks_budget else 0), where  # the longest prompts, the model turns, at least
