"""The playground's browser tests: the system Chromium driven by Playwright for Python.

Playwright is pointed at the OS package's Chromium (``scripts/setup.sh`` installs it with
apt when missing) and never downloads a browser; the closed network would make a default
Chromium hang on its background services, so those are switched off, and the profile is a
fresh empty directory.  One browser serves the whole package (``scope="package"``: it is
closed before the rest of the suite runs its own event loops); each test gets its own page.
Screenshots go to ``tmp/artifacts/`` (``$GLMSERVE_TEST_ARTIFACTS`` overrides).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, DESKTOP, SCRIPTED_KEY, Page
from servers import free_port


@pytest.fixture(scope="package")
def chromium() -> Iterator[object]:
    """A Chromium context (one empty profile) shared by the package's tests."""
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


@pytest.fixture(scope="package")
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
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the scripted server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)
