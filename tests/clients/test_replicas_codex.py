"""Codex CLI itself across two glmserve replicas behind a round-robin balancer, then behind
vllm-router as the README deploys it.

Two scripted servers (tests/scripted_server.py, the real app on a scripted GLM-4.7 model),
each with a cache directory of its own (as on two machines) but the same ``--secret-file``
and the same PostgreSQL store, behind :class:`replica_proxy.RoundRobin`.  Codex's first
turn (an ``exec_command`` call, reasoning sealed as ``encrypted_content``) lands on one
replica, its second turn (the command's output, the sealed reasoning sent back, Codex keeps
no state on the server: ``store: false``) on the other; the answer says the reasoning came
back ("kept"), which only happens if the second replica opened the first one's seal.

Behind vllm-router (``sticky_least_loaded``, ``--api-key``), Codex sends its session's
``X-Session-ID`` (``env_http_headers`` in its provider config), and both turns land on the
replica that served the first, whose prefix cache holds it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx

from codex_cli import codex_bin, run_codex
from replica_proxy import RoundRobin
from router import VllmRouter
from servers import free_port

from glmserve.bench.router import answered

SCRIPTED = Path(__file__).parents[1] / "scripted_server.py"


def _start(port: int, cache: Path, db: str, secret: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPTED), "--port", str(port), "--program", "codex", "--responses-db", db,
         "--api-key", "codex-key", "--secret-file", str(secret)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "GLMSERVE_CACHE": str(cache)})


def _wait_healthy(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def _replicas(tmp_path: Path, postgres, name: str) -> tuple[list[int], list[subprocess.Popen]]:
    """Two scripted replicas sharing a fresh database and a secret file, started and healthy."""
    db = postgres.fresh_database(name)
    secret = tmp_path / "server.key"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secrets.token_bytes(32))
    os.close(fd)
    ports = [free_port(), free_port()]
    procs = [_start(p, tmp_path / f"cache{i}", db, secret, tmp_path / f"replica{i}.log") for i, p in enumerate(ports)]
    try:
        for i, (p, proc) in enumerate(zip(ports, procs)):
            _wait_healthy(p, proc, tmp_path / f"replica{i}.log")
    except BaseException:
        _stop(procs)
        raise
    return ports, procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def test_codex_across_two_replicas(tmp_path: Path, postgres) -> None:
    codex_bin()
    ports, procs = _replicas(tmp_path, postgres, "codex_replicas")
    proxy = None
    try:
        proxy = RoundRobin([f"http://127.0.0.1:{p}" for p in ports])
        work = tmp_path / "work"
        work.mkdir()
        r = run_codex(proxy.base_url, "codex-key", "scripted", "Write 6*7 into codex_out.txt", work, 120,
                      "--dangerously-bypass-approvals-and-sandbox")
    finally:
        if proxy is not None:
            proxy.stop()
        _stop(procs)
    logs = "".join((tmp_path / f"replica{i}.log").read_text() for i in range(2))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out + logs
    assert (work / "codex_out.txt").read_text().strip() == "42"
    turns = [backend for backend, what in proxy.served if what == "POST /v1/responses"]
    assert len(turns) == 2 and turns[0] != turns[1], proxy.served  # the turns landed on different replicas
    assert "The command printed 42; reasoning kept." in r.stdout, out + logs
    assert "ERROR" not in out, out
    # each replica wrote no secret of its own: the shared file is the only one
    assert not list((tmp_path / "cache0").rglob("*.key")) and not list((tmp_path / "cache1").rglob("*.key"))


def test_codex_through_vllm_router(tmp_path: Path, postgres) -> None:
    codex_bin()
    ports, procs = _replicas(tmp_path, postgres, "codex_router")
    try:
        with VllmRouter([f"http://127.0.0.1:{p}" for p in ports], "sticky_least_loaded", "--api-key", "codex-key") as router:
            work = tmp_path / "work"
            work.mkdir()
            r = run_codex(router.base_url, "codex-key", "scripted", "Write 6*7 into codex_out.txt", work, 120,
                          "--dangerously-bypass-approvals-and-sandbox",
                          provider_toml='env_http_headers = { "X-Session-ID" = "CODEX_SESSION_ID" }\n',
                          env_extra={"CODEX_SESSION_ID": f"codex-{secrets.token_hex(6)}"})
            served = answered([f"http://127.0.0.1:{p}" for p in ports], "/v1/responses")
            router_log = router.log()
    finally:
        _stop(procs)
    logs = "".join((tmp_path / f"replica{i}.log").read_text() for i in range(2))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out + logs + router_log
    assert (work / "codex_out.txt").read_text().strip() == "42"
    assert sorted(served) == [0, 2], served  # both turns on the replica that served the first
    assert "The command printed 42; reasoning kept." in r.stdout, out + logs
    assert "ERROR" not in out, out
