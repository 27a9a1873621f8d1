"""The dashboard in a real browser (Debian's Chromium through Playwright) against the fake admin
API: sign-in, every view in light and dark and at phone width, text-only rendering of hostile
strings, the live channel (requests, logs, model states, dropped notice, reconnect), keys,
CSV export, sign-out. Screenshots go to DASHBOARD_SHOTS or a tmp folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser_helpers import PHONE, SIGNED_OUT_401, sign_in

pytestmark = pytest.mark.browser

try:
    from playwright.sync_api import expect
except ImportError:            # pragma: no cover - the browser fixture skips or fails first
    expect = None

XSS = "<img src=x onerror=alert(1)>"
VIEWS = {
    # view -> a locator whose content shows the view got its data
    "overview": ("#ov-state", "ready"),
    "models": ("#models-body", "llama-3.2-1b"),
    "activity": ("#usage-body", "alice"),
    "keys": ("#keys-body", "alice"),
    "logs": ("#logs-list", "server is listening"),
    "system": ("#gpu-body", "H100"),
}
README_SHOTS = Path(__file__).parent / "screenshots"


def get(url: str, cookie: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def session_cookie(page) -> dict:
    cookies = [c for c in page.context.cookies() if c["name"] == "llamagw_session"]
    assert len(cookies) == 1, cookies
    return cookies[0]


def no_markup(page, selector: str) -> None:
    """No element was made from data under `selector`, and no script ran."""
    assert page.locator(f"{selector} img, {selector} script, {selector} iframe").count() == 0
    assert page.locator(f"{selector} svg").count() == 0
    assert page.evaluate("window.__xss === undefined")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_view_renders_light_and_dark(fake, open_page, shots_dir, scheme):
    page, rec = open_page(color_scheme=scheme)
    response = page.goto(fake.url + "/ui/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "require-trusted-types-for 'script'" in csp
    rec.allow(SIGNED_OUT_401)
    sign_in(page, rec, fake.url, fake.admin_key)

    cookie = session_cookie(page)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert "llamagw_session" not in page.evaluate("document.cookie")
    assert fake.admin_key not in page.content()
    if hasattr(type(fake), "emit_request"):        # some traffic for the Activity screenshot
        for key_id, model, status, tokens in [("alice", "qwen3-8b", 200, 420),
                                              ("bob", "qwen3-8b", 200, 96),
                                              ("alice", "llama-3.2-1b", 429, 0),
                                              ("ci-bot", "qwen3-8b", 200, 1210),
                                              ("alice", "qwen3-8b", 502, 0)]:
            fake.emit_request(key_id=key_id, model=model, status=status,
                              completion_tokens=tokens, duration_ms=40 + tokens * 9.5)
        expect(page.locator("#activity-body tr")).to_have_count(5)

    for view, (selector, text) in VIEWS.items():
        page.click(f"#nav a[data-view={view}]")
        expect(page.locator(f"#view-{view}")).to_be_visible()
        expect(page.locator(selector)).to_contain_text(text)
        if view == "overview":   # the charts were drawn from the history sent in hello
            expect(page.locator("#chart-rps path.line")).to_have_count(1)
            expect(page.locator("#chart-ttft path.line")).to_have_count(2)
        assert page.locator(f"#nav a[data-view={view}]").get_attribute("aria-current") == "page"
        page.screenshot(path=str(shots_dir / f"{view}-{scheme}.png"), full_page=True)
    if scheme == "light" and os.environ.get("UPDATE_README_SCREENSHOTS") == "1":
        README_SHOTS.mkdir(exist_ok=True)
        for view in ("overview", "models"):
            shutil.copy(shots_dir / f"{view}-light.png", README_SHOTS / f"{view}.png")


def test_views_at_phone_width(fake, open_page, shots_dir):
    page, rec = open_page(color_scheme="dark", viewport=PHONE)
    sign_in(page, rec, fake.url, fake.admin_key)
    for view in ("overview", "models", "activity", "logs"):
        page.goto(f"{fake.url}/ui/#{view}")
        selector, text = VIEWS[view]
        expect(page.locator(selector)).to_contain_text(text)
        # nothing wider than the screen but the tables' own scroll boxes
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (view, width)
        page.screenshot(path=str(shots_dir / f"{view}-phone.png"), full_page=True)
    page.goto(f"{fake.url}/ui/#overview")
    expect(page.locator("#signout")).to_be_visible()
    for view in VIEWS:
        expect(page.locator(f"#nav a[data-view={view}]")).to_be_attached()


def test_hostile_strings_render_as_text(fake, open_page):
    page, rec = open_page()
    sign_in(page, rec, fake.url, fake.admin_key)
    page.goto(fake.url + "/ui/#models")
    row = page.locator("#models-body tr", has_text="onerror")
    expect(row.locator("td.name")).to_contain_text(XSS)
    expect(row.locator("td.name")).to_contain_text('"><svg onload=alert(2)>')
    no_markup(page, "#models-body")

    page.goto(fake.url + "/ui/#activity")
    fake.emit_request(model=XSS, route='/v1/x"><script>window.__xss=1</script>',
                      key_id="eve", status=500)
    expect(page.locator("#activity-body tr", has_text="eve")).to_contain_text(XSS)
    no_markup(page, "#activity-body")

    page.goto(fake.url + "/ui/#logs")
    fake.emit_log(f"prompt echo {XSS} and <svg onload=alert(3)>")
    expect(page.locator("#logs-list")).to_contain_text(f"prompt echo {XSS}")
    no_markup(page, "#logs-list")

    page.goto(fake.url + "/ui/#overview")    # the 500 is in Recent errors, as text
    expect(page.locator("#ov-recent-errors")).to_contain_text(XSS)
    no_markup(page, "#ov-recent-errors")


def test_an_inference_key_or_a_wrong_key_cannot_sign_in(fake, open_page):
    page, rec = open_page()
    rec.allow(re.compile(r"status of (401|403) .* @ https?://[^/]+/admin/session$"))
    page.goto(fake.url + "/ui/")
    page.fill("#key", fake.user_key)
    page.click("#signin-button")
    expect(page.locator("#signin-error")).to_contain_text("inference key")
    page.fill("#key", "sk-not-a-key-at-all-0000000000")
    page.press("#key", "Enter")
    expect(page.locator("#signin-error")).to_contain_text("not valid")
    expect(page.locator("#app")).to_be_hidden()
    expect(page.locator("#setup-note")).to_be_hidden()
    assert page.input_value("#key") == ""
    assert page.context.cookies() == []


def test_setup_note_when_there_is_no_admin_key(tmp_path, open_page, shots_dir):
    from fakes.fake_admin import FakeAdmin
    server = FakeAdmin(str(tmp_path / "data"), admin_keys=False).start()
    try:
        page, rec = open_page()
        rec.allow(SIGNED_OUT_401)
        page.goto(server.url + "/ui/")
        expect(page.locator("#setup-note")).to_be_visible()
        expect(page.locator("#setup-note")).to_contain_text("keys.py add NAME --role admin")
        expect(page.locator("#key")).to_be_focused()
        page.screenshot(path=str(shots_dir / "signin-setup-light.png"))
    finally:
        server.stop()


def test_sign_out_revokes_the_session_server_side(fake, open_page):
    page, rec = open_page()
    sign_in(page, rec, fake.url, fake.admin_key)
    cookie = session_cookie(page)
    header = f"llamagw_session={cookie['value']}"
    assert get(fake.url + "/admin/session", header) == 200
    page.click("#signout")
    expect(page.locator("#signin-view")).to_be_visible()
    expect(page.locator("#signin-error")).to_have_text("Signed out.")
    assert get(fake.url + "/admin/session", header) == 401      # the old cookie is refused
    assert get(fake.url + "/admin/models", header) == 401
    assert [c for c in page.context.cookies() if c["name"] == "llamagw_session"] == []
    page.reload()                                                 # stays signed out
    expect(page.locator("#signin-view")).to_be_visible()


def test_a_live_request_appears_in_activity(fake, open_page):
    page, rec = open_page()
    sign_in(page, rec, fake.url, fake.admin_key)
    page.goto(fake.url + "/ui/#activity")
    expect(page.locator("#activity-empty")).to_be_visible()
    fake.emit_request(key_id="carol", model="qwen3-8b", status=200, prompt_tokens=1234,
                      completion_tokens=56, duration_ms=2340.0, ttfb_ms=87.0)
    row = page.locator("#activity-body tr", has_text="carol")
    expect(row).to_be_visible(timeout=2000)
    expect(row).to_contain_text("/v1/chat/completions")
    expect(row).to_contain_text("1,234 / 56")
    expect(row).to_contain_text("2.34 s")
    expect(row).to_contain_text("87 ms")
    # the filter hides the others and brings them back
    fake.emit_request(key_id="dave", model="llama-3.2-1b", status=429)
    expect(page.locator("#activity-body tr", has_text="dave")).to_be_visible(timeout=2000)
    page.fill("#activity-filter", "carol")
    expect(page.locator("#activity-body tr")).to_have_count(1)
    page.fill("#activity-filter", "")
    expect(page.locator("#activity-body tr")).to_have_count(2)


def test_logs_follow_live_lines_bounded_and_pause_on_scroll(fake, open_page):
    page, rec = open_page()
    sign_in(page, rec, fake.url, fake.admin_key)
    page.goto(fake.url + "/ui/#logs")
    expect(page.locator("#logs-list")).to_contain_text("server is listening")
    fake.emit_log("slot 0 | new line from llama-server", source="llama")
    expect(page.locator("#logs-list")).to_contain_text("new line from llama-server",
                                                       timeout=2000)
    fake.emit_log(f"leaked Bearer sk-{'A' * 40}", level="error")   # redacted by the ring
    expect(page.locator("#logs-list")).to_contain_text("leaked Bearer ***")
    expect(page.locator("#logs-list")).not_to_contain_text("AAAAAAAAAA")

    for i in range(700):
        fake.emit_log(f"burst line {i:04d}")
    expect(page.locator("#logs-list")).to_contain_text("burst line 0699", timeout=5000)
    assert page.locator("#logs-list .logline").count() <= 500

    page.select_option("#logs-level", "error")        # the level filter
    expect(page.locator("#logs-list .logline")).to_have_count(2)   # the seed's boot error + ours
    page.select_option("#logs-level", "")
    page.locator("#logs-box").evaluate("box => { box.scrollTop = 0; }")
    expect(page.locator("#logs-follow")).to_be_visible()
    fake.emit_log("after the pause")
    expect(page.locator("#logs-follow")).to_contain_text("1 new line")
    page.click("#logs-follow")
    expect(page.locator("#logs-follow")).to_be_hidden()


def test_load_and_unload_change_the_state_live(fake, open_page):
    page, rec = open_page()
    sign_in(page, rec, fake.url, fake.admin_key)
    page.goto(fake.url + "/ui/#models")
    row = page.locator("#models-body tr[data-model='llama-3.2-1b']")
    expect(row.locator(".badge").first).to_have_text("unloaded")
    row.locator("button[data-action=load]").click()
    expect(row.locator(".badge").first).to_have_text("loaded", timeout=3000)
    expect(page.locator("#toasts")).to_contain_text("llama-3.2-1b is loaded.")
    row.locator("button[data-action=unload]").click()
    expect(row.locator(".badge").first).to_have_text("unloaded", timeout=3000)

    broken = page.locator("#models-body tr[data-model='broken-model']")
    broken.locator("button[data-action=load]").click()
    expect(broken.locator(".badge").first).to_have_text("failed", timeout=3000)
    expect(page.locator("#toasts")).to_contain_text("broken-model failed to load")
    # every POST carried the session's CSRF token (the fake answers 403 otherwise)
    posts = [c for c in fake.calls if c[0] == "POST" and c[1].startswith("/admin/models/")]
    assert [c[2] for c in posts] == [200, 200, 200]

    # an unload with requests in flight asks first; Cancel sends nothing
    loaded = page.locator("#models-body tr[data-model='qwen3-8b']")
    loaded.locator("button[data-action=unload]").click()
    expect(page.locator("#confirm")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("1 request(s) in flight")
    page.click("#confirm-cancel")
    expect(page.locator("#confirm")).to_be_hidden()
    assert len([c for c in fake.calls if c[0] == "POST" and c[1].startswith("/admin/models/")]) == 3


def test_keys_create_rotate_revoke(fake, open_page):
    page, rec = open_page()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    sign_in(page, rec, fake.url, fake.admin_key)
    page.goto(fake.url + "/ui/#keys")
    expect(page.locator("#keys-body")).to_contain_text("bob")
    page.fill("#new-key-id", "dave")
    page.fill("#new-key-rpm", "30")
    page.fill("#new-key-models", "qwen3-8b")
    page.click("#key-create-button")
    expect(page.locator("#secret-box")).to_be_visible()
    secret = page.locator("#secret-value").inner_text()
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", secret)
    row = page.locator("#keys-body tr[data-key=dave]")
    expect(row).to_contain_text("30")
    expect(row).to_contain_text("qwen3-8b")
    page.click("#secret-copy")
    expect(page.locator("#secret-copy")).to_have_text(re.compile("Copied|Selected"))
    page.click("#secret-done")
    expect(page.locator("#secret-box")).to_be_hidden()
    assert secret not in page.content()          # shown once, then gone from the page
    keys = json.dumps(fake._list_keys())
    assert secret not in keys

    row.locator("button[data-action=rotate]").click()
    page.click("#confirm-ok")
    expect(page.locator("#secret-box")).to_be_visible()
    assert page.locator("#secret-value").inner_text() not in ("", secret)
    page.click("#secret-done")

    row.locator("button[data-action=revoke]").click()
    expect(page.locator("#confirm-text")).to_contain_text("Revoke dave?")
    page.click("#confirm-ok")
    expect(page.locator("#keys-body tr[data-key=dave]")).to_have_count(0)
    expect(page.locator("#keys-body")).to_contain_text("alice")


def test_usage_ranges_and_csv_export(fake, open_page, tmp_path):
    page, rec = open_page()
    sign_in(page, rec, fake.url, fake.admin_key)
    page.goto(fake.url + "/ui/#activity")
    expect(page.locator("#usage-body")).to_contain_text("alice")
    expect(page.locator("#usage-body")).not_to_contain_text("ci-bot")    # not today
    page.click("#usage-range button[data-range='30d']")
    expect(page.locator("#usage-body")).to_contain_text("ci-bot")
    expect(page.locator("#usage-chart rect")).to_have_count(6)          # 3 keys x 2 parts
    with page.expect_download() as info:
        page.click("#usage-csv")
    path = tmp_path / "usage.csv"
    info.value.save_as(path)
    text = path.read_bytes().decode()
    assert text.startswith("key_id,requests,prompt_tokens,completion_tokens,errors\r\n")
    assert "\r\nci-bot,2,4800,900,1\r\n" in text            # 30 days: not the 40-day-old row
    assert info.value.suggested_filename.startswith("usage-by-key-30d-")


def test_dropped_notice_and_reconnect(fake, open_page):
    page, rec = open_page()
    sign_in(page, rec, fake.url, fake.admin_key)
    fake.publish("dropped", {"count": 3})
    expect(page.locator("#notice")).to_be_visible()
    expect(page.locator("#notice-text")).to_contain_text("dropped 3 event(s)")
    page.click("#notice-close")
    expect(page.locator("#notice")).to_be_hidden()

    before = len([c for c in fake.calls if c[1] == "/admin/live"])
    fake.drop_live()
    expect(page.locator("#conn")).to_have_text("reconnecting")
    expect(page.locator("#conn")).to_have_text("live", timeout=5000)
    assert len([c for c in fake.calls if c[1] == "/admin/live"]) == before + 1
    fake.emit_request(key_id="after-reconnect")
    page.goto(fake.url + "/ui/#activity")
    fake.emit_request(key_id="after-reconnect-2")
    expect(page.locator("#activity-body")).to_contain_text("after-reconnect-2", timeout=2000)
