"""What the playground's browser tests share: the system Chromium driven by Playwright for Python.

Playwright is pointed at the OS package's Chromium (``scripts/setup.sh`` installs it with
apt when missing) and never downloads a browser; the closed network would make a default
Chromium hang on its background services, so those are switched off, and the profile is a
fresh empty directory.  One browser serves the whole module (``scope="module"``: it is
closed before the rest of the suite runs its own event loops); each test gets its own page.
Screenshots go to ``tmp/artifacts/`` (``$GLMSERVE_TEST_ARTIFACTS`` overrides).

The fixtures live here, not in a conftest.py: the suite's modules import ``tests/conftest.py``
as ``conftest``, which a second conftest.py would shadow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import free_port, wait_healthy

CHROMIUM = os.environ.get("GLMSERVE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("GLMSERVE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "tmp" / "artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--disable-extensions"]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
SCRIPTED_KEY = "playground-key"


class Page:
    """A page of the playground with its console watched: every error or warning it logs, and
    every uncaught exception, is kept in ``problems`` (a test ends asserting there are none)."""

    def __init__(self, context, url: str, key: str | None = None, viewport: dict | None = None) -> None:
        self.page = context.new_page()
        self.problems: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        if viewport:
            self.page.set_viewport_size(viewport)
        if key is not None:  # as if typed earlier in this tab
            self.page.add_init_script(f"sessionStorage.setItem('glmserve.key', {key!r})")
        self.page.goto(url + "/ui")
        self.page.wait_for_selector("body[data-ready=true]")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    def close(self) -> None:
        self.page.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """A Chromium context (one empty profile) shared by the module's tests."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: scripts/setup.sh installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="glmserve-chromium-")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport=DESKTOP)
        context.set_default_timeout(120_000)  # a loaded 2-core machine: a first grammar compile takes seconds
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture()
def open_page(chromium):
    pages: list[Page] = []

    def open_(url: str, key: str | None = None, viewport: dict | None = None) -> Page:
        page = Page(chromium, url, key, viewport)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()


@pytest.fixture(scope="module")
def scripted_ui(tmp_path_factory) -> Iterator[str]:
    """tests/scripted_server.py's playground program (GLM-4.7 output chosen by the prompt) with
    the inspector on and an API key: the real app over real HTTP, answering in milliseconds."""
    tmp = tmp_path_factory.mktemp("scripted-ui")
    port = free_port()
    log = tmp / "server.log"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "scripted_server.py"), "--port", str(port),
                             "--program", "playground", "--chat-format", "glm47", "--inspect", "50",
                             "--api-key", SCRIPTED_KEY, "--responses-db", str(tmp / "r.sqlite3")],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 60, log)
    yield url
    proc.terminate()
    proc.wait(10)
