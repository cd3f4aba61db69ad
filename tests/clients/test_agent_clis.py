"""OpenCode, Cline, Kilo Code and Qwen Code (its OpenAI chat, OpenAI responses and Anthropic
modes) through whole sessions against glmserve, offline, as Z.ai's GLM users run them:
read -> edit (Chinese text) -> shell -> answer, with a scripted GLM-4.7 / GLM-4.5 model
(tests/agent_clis.py).  Each session must end with exit 0, the files byte-exact, one 200 per
model turn (no retry, no 4xx) and no request anywhere but glmserve.

Every session runs at a served context smaller than its prompt plus the budget its CLI asks
for (OpenCode and Kilo: ``max_tokens`` 32000 on every turn, Qwen Code 16384 / 32000): glmserve
grants the room left, as vLLM does.  Before that clamp Chat Completions answered 400
``context_length_exceeded`` and these CLIs looped (OpenCode compacts and retries) or exited 1.
Cline asks for no budget and is granted all the room.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent_clis import (CLINE, CLINE_TOOLS, KEY, KILO, OPENCODE, OPENCODE_TOOLS, QWEN, QWEN_TOOLS, TASK, SessionServer,
                        check_session, run_session)


@pytest.fixture(scope="module")
def glm47():
    s = SessionServer("glm47", "glm-4.7")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def glm45():
    s = SessionServer("glm45", "glm-4.5")
    yield s
    s.stop()


# --------------------------------------------------------------------------- OpenCode and Kilo


def opencode_config(base_url: str, model: str, schema: str, api_key: str) -> dict:
    """An OpenAI-compatible provider named ``glmserve`` serving ``model``, the only provider
    enabled (Kilo otherwise lists its own gateway's models over the network)."""
    return {"$schema": schema,
            "provider": {"glmserve": {"npm": "@ai-sdk/openai-compatible", "name": "glmserve",
                                      "options": {"baseURL": base_url + "/v1", "apiKey": api_key},
                                      "models": {model: {"name": model}}}},
            "enabled_providers": ["glmserve"], "model": f"glmserve/{model}", "small_model": f"glmserve/{model}",
            "autoupdate": False, "share": "disabled"}


def test_opencode_session(glm47: SessionServer, tmp_path: Path) -> None:
    def setup(home: Path, work: Path, url: str):
        config = opencode_config(url, glm47.model, "https://opencode.ai/config.json", "{env:GLMSERVE_API_KEY}")
        (work / "opencode.json").write_text(json.dumps(config, indent=2))
        # OpenCode installs @opencode-ai/plugin into its config directory from the npm registry
        # in the background unless a lockfile there already names it
        plugin_dir = home / ".config" / "opencode"
        (plugin_dir / "node_modules").mkdir(parents=True)
        (plugin_dir / "package-lock.json").write_text(json.dumps(
            {"packages": {"": {"dependencies": {"@opencode-ai/plugin": OPENCODE.version}}}}))
        env = {f"OPENCODE_{s}": "1" for s in ("DISABLE_AUTOUPDATE", "DISABLE_MODELS_FETCH", "DISABLE_LSP_DOWNLOAD",
                                              "DISABLE_DEFAULT_PLUGINS", "DISABLE_SHARE")}
        env["GLMSERVE_API_KEY"] = KEY
        return [[str(OPENCODE.path()), "run", TASK]], env

    run = run_session(glm47, OPENCODE_TOOLS, tmp_path, 44_000, setup)
    check_session(run, "/v1/chat/completions", tmp_path / "work" / "notes.md", 44_000, asks_budget=True)


def test_kilo_session(glm47: SessionServer, tmp_path: Path) -> None:
    def setup(home: Path, work: Path, url: str):
        # Kilo 7.7.7 takes no {env:...} here: it skips the whole file (ConfigInvalidError in its log)
        # and falls back to its own gateway
        config = opencode_config(url, glm47.model, "https://app.kilo.ai/config.json", KEY)
        (work / "kilo.json").write_text(json.dumps(config, indent=2))
        env = {f"KILO_{s}": "1" for s in ("DISABLE_AUTOUPDATE", "DISABLE_MODELS_FETCH", "DISABLE_LSP_DOWNLOAD",
                                          "DISABLE_DEFAULT_PLUGINS", "DISABLE_SHARE", "DISABLE_SESSION_INGEST",
                                          "DISABLE_PRESENCE", "DISABLE_CODEBASE_INDEXING")}
        env["KILO_TELEMETRY_LEVEL"] = "off"
        return [[str(KILO.path()), "run", "--auto", TASK]], env  # --auto: run tools without asking

    run = run_session(glm47, OPENCODE_TOOLS, tmp_path, 64_000, setup)
    check_session(run, "/v1/chat/completions", tmp_path / "work" / "notes.md", 64_000, asks_budget=True)


# --------------------------------------------------------------------------- Cline


def test_cline_session(glm45: SessionServer, tmp_path: Path) -> None:
    def setup(home: Path, work: Path, url: str):
        data = home / ".cline" / "data"
        (data / "settings").mkdir(parents=True)
        (data / "cache").mkdir()
        (data / "settings" / "global-settings.json").write_text(json.dumps(
            {"telemetryOptOut": True, "autoUpdateEnabled": False}))
        # a fresh feature-flag cache: without one Cline fetches its flags at start.  The local
        # backend runs the session in-process: by default Cline starts a hub daemon on port 25463
        # that outlives the run (and joins whichever hub already listens there)
        (data / "cache" / "feature-flags.json").write_text(json.dumps(
            {"version": 2, "updatedAt": int(time.time() * 1000), "userId": None,
             "flagsPayload": {"featureFlags": {}, "featureFlagPayloads": {}}}))
        cline = str(CLINE.path())
        return [[cline, "auth", "-p", "openai-compatible", "-k", KEY, "-m", glm45.model, "-b", url + "/v1"],
                [cline, TASK]], {"CLINE_NO_AUTO_UPDATE": "1", "CLINE_SESSION_BACKEND_MODE": "local"}

    run = run_session(glm45, CLINE_TOOLS, tmp_path, 36_000, setup)
    check_session(run, "/v1/chat/completions", tmp_path / "work" / "notes.md", 36_000, asks_budget=False)


# --------------------------------------------------------------------------- Qwen Code

QWEN_MODES = {  # --auth-type: (server, endpoint, its environment)
    "openai": ("glm47", "/v1/chat/completions", "OPENAI"),
    "openai-responses": ("glm45", "/v1/responses", "OPENAI"),
    "anthropic": ("glm45", "/v1/messages", "ANTHROPIC"),
}


@pytest.mark.parametrize("mode", QWEN_MODES)
def test_qwen_code_session(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fixture, endpoint, prefix = QWEN_MODES[mode]
    server: SessionServer = request.getfixturevalue(fixture)

    def setup(home: Path, work: Path, url: str):
        (home / ".qwen").mkdir()
        (home / ".qwen" / "settings.json").write_text(json.dumps({
            "security": {"auth": {"selectedType": mode}},
            "privacy": {"usageStatisticsEnabled": False},
            "telemetry": {"enabled": False},
            "general": {"enableAutoUpdate": False},
            # a one-shot prompt runs commands with child_process, whose output Qwen Code 0.24.4 reads
            # on the child's exit event and can lose (a fast command's output arrives after it):
            # the PTY path reads until the terminal closes
            "tools": {"shell": {"enableInteractiveShell": True}},
            # the memory subagent would add a model turn after the session
            "memory": {"enableManagedAutoMemory": False, "enableManagedAutoDream": False},
        }))
        base = url + "/v1" if prefix == "OPENAI" else url
        env = {f"{prefix}_API_KEY": KEY, f"{prefix}_BASE_URL": base, f"{prefix}_MODEL": server.model}
        return [[str(QWEN.path()), "--auth-type", mode, "--yolo", TASK]], env

    run = run_session(server, QWEN_TOOLS, tmp_path, 74_000, setup)
    check_session(run, endpoint, tmp_path / "work" / "notes.md", 74_000, asks_budget=True)


def test_every_cli_is_pinned_in_setup() -> None:
    """The versions the sessions were written for are the ones scripts/setup.sh installs."""
    setup = (Path(__file__).parents[2] / "scripts" / "setup.sh").read_text()
    for cli in (OPENCODE, CLINE, KILO, QWEN):
        assert f'"{cli.package}@{cli.version} {cli.folder} {cli.bin}"' in setup, cli
