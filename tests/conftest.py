"""Shared fixtures: one real server per model, started once per test session."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# CI replays the same examples every run (a red CI should be a regression, not a new draw);
# locally hypothesis explores fresh examples.  Tests' own max_examples/deadline still apply.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from servers import Server, start_server  # noqa: E402

DATA = Path(__file__).parent / "data"


def load_jsonl(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from glmserve.models import default_model_dir as d

    return str(d())


def _tiny(kind: str) -> str:
    from tiny_models import build_tiny

    return str(build_tiny(kind))


@pytest.fixture(scope="session")
def default_server() -> Server:
    """The embedded default (SmolLM2-135M-Instruct, ChatML) started with no MODEL argument, the
    request inspector on (the playground's browser test opens its entries; every other test
    then runs with it watching)."""
    s = start_server(None, "--inspect", "200")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def glm4_server() -> Server:
    s = start_server(_tiny("glm4"), "--chat-format", "glm4", "--served-model-name", "tiny-glm4")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def glm0414_server() -> Server:
    s = start_server(_tiny("glm4-0414"), "--served-model-name", "tiny-glm4-0414")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def glm45_server() -> Server:
    s = start_server(_tiny("glm45"), "--chat-format", "glm45", "--served-model-name", "tiny-glm45")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server of the suite's own (tests/postgres.py), started once; each
    user takes a fresh database with ``postgres.fresh_database(name)``."""
    from postgres import PostgresServer

    pg = PostgresServer().start()
    yield pg
    pg.destroy()
