"""What the playground's browser tests share: where Chromium is and how it is launched, the
widths, and a page whose console is watched (see conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

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
