"""Fixtures of the real-browser tier: Debian's Chromium driven by Playwright (never a browser
download), against the real stack (test_dashboard_stack.py: entrypoint.sh, llama-server, the
gateway) and against the fake admin API (tests/fakes/fake_admin.py, test_dashboard.py: the
situations the real stack cannot make on demand), on 127.0.0.1. /work/shared/DASHBOARD.md part B
is the recipe.

- CHROMIUM_BIN (default /usr/bin/chromium, the `chromium` package). Without it or without the
  playwright package the tests skip with the reason, unless REQUIRE_BROWSER=1 (set by
  `make test-browser` and .ci/run), which makes that a failure: a green CI cannot hide a missing
  install.
- DASHBOARD_SHOTS: a folder for the screenshots (default: a pytest tmp folder).
- DASHBOARD_URL: point the tests at a running gateway instead of the fake (later, once the
  gateway serves /ui/ and /admin/); DASHBOARD_ADMIN_KEY and DASHBOARD_USER_KEY then give the
  keys. Tests that drive the fake's controls (emit a request, a log line) need the fake.

Every page records console errors, page errors and dialogs; a test fails if any appears that it
did not expect (the strict CSP with Trusted Types turns a stray innerHTML into a page error).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from browser_helpers import CHROMIUM, DESKTOP, FAKE_GPU, REQUIRE

try:
    from playwright.sync_api import sync_playwright
except ImportError:            # pragma: no cover - depends on the machine
    sync_playwright = None


def _unavailable() -> str | None:
    if sync_playwright is None:
        return "the playwright package is not installed (pip install -r requirements-dev.txt)"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="session")
def browser():
    why = _unavailable()
    if why:
        if REQUIRE:
            pytest.fail(f"REQUIRE_BROWSER=1 but {why}", pytrace=False)
        pytest.skip(why)
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory) -> Path:
    folder = os.environ.get("DASHBOARD_SHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("dashboard-shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class RemoteTarget:
    """DASHBOARD_URL: a running gateway. No test controls: tests that need them skip."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.admin_key = os.environ.get("DASHBOARD_ADMIN_KEY", "")
        self.user_key = os.environ.get("DASHBOARD_USER_KEY", "")

    def __getattr__(self, name):
        pytest.skip(f"{name}: needs the fake admin API's test controls (DASHBOARD_URL is set)")


@pytest.fixture
def fake(tmp_path):
    """A fresh fake admin API (own keys, sessions, models) for each test."""
    if os.environ.get("DASHBOARD_URL"):
        yield RemoteTarget(os.environ["DASHBOARD_URL"])
        return
    from fakes.fake_admin import FakeAdmin
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\necho "{FAKE_GPU}"\n')
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    server = FakeAdmin(str(tmp_path / "data"), nvidia_smi=str(smi)).start()
    yield server
    server.stop()


class Recorder:
    """Console errors, page errors and dialogs of one page."""

    def __init__(self, page):
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self.dialogs: list[str] = []
        self.allowed: list[re.Pattern] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("dialog", self._on_dialog)

    def _on_console(self, msg) -> None:
        if msg.type == "error":
            self.console.append(f"{msg.text} @ {msg.location.get('url', '')}")

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def allow(self, pattern: re.Pattern) -> None:
        self.allowed.append(pattern)

    def unexpected(self) -> list[str]:
        errors = [e for e in self.console if not any(p.search(e) for p in self.allowed)]
        return errors + [f"pageerror: {e}" for e in self.page_errors] + \
            [f"dialog: {d}" for d in self.dialogs]


@pytest.fixture
def open_page(browser):
    """open_page(color_scheme="light", viewport=DESKTOP) -> (page, recorder); each page in its
    own context (no shared cookies). At the end: no unexpected console error, page error or
    dialog on any of them."""
    made = []

    def factory(color_scheme: str = "light", viewport: dict | None = None):
        context = browser.new_context(color_scheme=color_scheme, viewport=viewport or DESKTOP,
                                      accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(5000)
        recorder = Recorder(page)
        made.append((context, recorder))
        return page, recorder

    yield factory
    problems = []
    for context, recorder in made:
        problems += recorder.unexpected()
        context.close()
    assert problems == [], problems
