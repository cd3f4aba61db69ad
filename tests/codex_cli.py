"""Running Codex CLI (npm ``@openai/codex``, pinned in scripts/setup.sh) against a glmserve, for
``tests/clients/test_responses_codex.py`` and ``tests/e2e/test_e2e_responses.py``.

Skips only when node is absent; with node present a missing Codex is a failure (run
``bash scripts/setup.sh``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


CODEX_VERSION = "0.169.0"


def codex_bin() -> Path:
    if shutil.which("node") is None:
        pytest.skip("node is not installed, so Codex CLI cannot run")
    path = Path(os.environ.get("GLMSERVE_CODEX") or Path(sys.prefix) / "node" / "node_modules" / ".bin" / "codex")
    assert path.exists(), f"Codex CLI not found at {path}: run `bash scripts/setup.sh` (it installs @openai/codex)"
    return path


def model_catalog(model: str) -> dict:
    """A Codex model catalog (``model_catalog_json``) naming ``model``, with the fields Codex
    0.169.0 requires of an entry; ``apply_patch_tool_type: "freeform"`` makes Codex declare
    ``apply_patch`` as a custom tool with its Lark grammar (as it does for OpenAI's own models)."""
    return {"models": [{
        "slug": model, "display_name": model, "base_instructions": "You are Codex, a coding agent.",
        "apply_patch_tool_type": "freeform", "shell_type": "shell_command", "visibility": "list",
        "supported_in_api": True, "priority": 1, "support_verbosity": False,
        "truncation_policy": {"mode": "tokens", "limit": 10000}, "supported_reasoning_levels": [],
        "experimental_supported_tools": [], "context_window": 65536}]}


def run_codex(base_url: str, key: str, model: str, prompt: str, workdir: Path, timeout: float = 180,
              *extra: str, provider_toml: str = "", env_extra: dict[str, str] | None = None,
              catalog: bool = False) -> subprocess.CompletedProcess[str]:
    """``codex exec PROMPT`` in ``workdir`` with glmserve as its only provider (``provider_toml``:
    more lines of its ``[model_providers.glmserve]`` table, e.g. ``env_http_headers``; ``catalog``:
    with a model catalog naming ``model``, :func:`model_catalog`)."""
    home = workdir.parent / (workdir.name + "-codex-home")
    home.mkdir(exist_ok=True)
    top = f'model = "{model}"\nmodel_provider = "glmserve"\n'
    if catalog:
        (home / "models.json").write_text(json.dumps(model_catalog(model)))
        top += f'model_catalog_json = "{home / "models.json"}"\n'
    (home / "config.toml").write_text(
        top + f'[model_providers.glmserve]\nname = "glmserve"\nbase_url = "{base_url}"\n'
        f'env_key = "GLMSERVE_TEST_KEY"\nwire_api = "responses"\nrequest_max_retries = 0\n'
        f'stream_max_retries = 0\n{provider_toml}'
    )
    env = {**os.environ, "CODEX_HOME": str(home), "GLMSERVE_TEST_KEY": key, "NO_COLOR": "1", **(env_extra or {})}
    return subprocess.run([str(codex_bin()), "exec", "--skip-git-repo-check", *extra, prompt], cwd=workdir, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
