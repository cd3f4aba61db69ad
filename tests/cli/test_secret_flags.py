"""``glmserve serve`` refuses a bad server secret at once, with a message that says what to fix,
before vLLM is imported or the engine loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from glmserve.cli import _load_secret
from glmserve.server_secret import ServerSecret


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GLMSERVE_SECRET")
            and k != "GLMSERVE_PREVIOUS_SECRET"}
    return subprocess.run([sys.executable, "-m", "glmserve", "serve", *args], capture_output=True, text=True,
                          timeout=60, env={**full, **(env or {})})


def _file(tmp: Path, name: str, data: bytes, mode: int = 0o600) -> str:
    p = tmp / name
    p.write_bytes(data)
    p.chmod(mode)
    return str(p)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("short", "16 bytes; a secret must be at least 32 random bytes"),
    ("readable", "mode 0644 lets group or others access it; it must be 0600 or stricter"),
    ("env", "GLMSERVE_SECRET holds 8 bytes"),
    ("previous", "--previous-secret-file"),
])
def test_bad_secret_is_refused_before_the_engine(tmp_path: Path, case: str, message: str) -> None:
    args: list[str] = []
    env: dict[str, str] = {}
    if case == "missing":
        args = ["--secret-file", str(tmp_path / "nope.key")]
    elif case == "short":
        args = ["--secret-file", _file(tmp_path, "s.key", os.urandom(16))]
    elif case == "readable":
        args = ["--secret-file", _file(tmp_path, "s.key", os.urandom(32), 0o644)]
    elif case == "env":
        env = {"GLMSERVE_SECRET": os.urandom(8).hex()}
    else:
        args = ["--secret-file", _file(tmp_path, "s.key", os.urandom(32)),
                "--previous-secret-file", str(tmp_path / "gone.key")]
    r = serve(*args, "--port", "1", env=env)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert "vllm" not in r.stderr.lower()  # refused before vLLM was imported


def test_good_secret_passes_the_early_check(tmp_path: Path) -> None:
    data = os.urandom(40)
    got = _load_secret(["--port", "9", "--secret-file", _file(tmp_path, "s.key", data), "--enforce-eager"])
    assert isinstance(got, ServerSecret) and got.keys("x") == ServerSecret(data).keys("x")
