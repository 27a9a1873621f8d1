"""Constants and helpers of the browser tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import re

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
REQUIRE = os.environ.get("REQUIRE_BROWSER", "") == "1"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# What a page that is not signed in logs by design: GET /admin/session answers 401 (the
# contract), and Chromium reports every 4xx resource as a console error.
SIGNED_OUT_401 = re.compile(r"Failed to load resource: the server responded with a status of 401"
                            r".* @ https?://[^/]+/admin/session$")
FAKE_GPU = "NVIDIA H100 80GB HBM3, 63, 41234, 81559, 58, 312.40"


def sign_in(page, recorder, base_url: str, key: str) -> None:
    """Open the dashboard, type the key, press Enter; wait for the app."""
    from playwright.sync_api import expect
    recorder.allow(SIGNED_OUT_401)          # the page asks GET /admin/session first
    page.goto(base_url + "/ui/")
    expect(page.locator("#signin-view")).to_be_visible()
    page.fill("#key", key)
    page.press("#key", "Enter")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#conn")).to_have_text("live")
