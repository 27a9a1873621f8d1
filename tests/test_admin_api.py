"""The admin API on the real gateway (loopback tier): who may use it, sign-in and sign-out,
the key file from the API, the dashboard's files. The walk over api/routes.ADMIN_ROUTES covers
every admin route, those added later by others included."""

from __future__ import annotations

import asyncio
import logging
import re
import tomllib
from pathlib import Path

from admin_helpers import (ADMIN_KEY_FILE, OPS, OPS2, SECURITY_HEADERS, SSE, admin_stack, sget,
                           sign_in, spost)
from helpers import ALICE, BOB, Stack, aio, chat, get, post

from llamagw.admin import plane
from llamagw.api import routes
from llamagw.limits import keyfile, keys
from llamagw.limits.admission import Auth

GUARDED = [r for r in routes.ADMIN_ROUTES if r.auth is Auth.ADMIN]
STATE_CHANGES = [r for r in GUARDED if r.method == "POST"]
FOREIGN = b"Origin: https://evil.example\r\n"
CORS_ENV = {"CORS_ORIGINS": "https://evil.example"}


def request_for(route, key: str | None = None, extra: bytes = b"") -> bytes:
    if route.method == "POST":
        return post(route.path, {}, key=key, extra=extra)
    return get(route.path, key=key, extra=extra)


def assert_admin_answer(r, status: int, code: str | None = None) -> None:
    assert r.status == status, r
    if code is not None:
        assert r.error()["code"] == code, r
    for name in SECURITY_HEADERS:
        assert r.get(name), (name, r)
    assert not [n for n, _ in r.headers if n.startswith("access-control-")], r


def test_the_walk_sees_the_admin_routes():
    assert {r.path for r in GUARDED} >= {"/admin/live", "/admin/keys", "/admin/session/logout"}
    assert STATE_CHANGES


@aio
async def test_every_admin_route_refuses_without_credentials_or_with_an_inference_key(tmp_path):
    async with Stack(tmp_path, CORS_ENV) as s:
        await admin_stack(s)
        session = await sign_in(s)
        for route in GUARDED:
            r = await s.one(request_for(route, extra=FOREIGN))
            assert_admin_answer(r, 401, "unauthorized")
            assert r.get("www-authenticate").startswith("Bearer"), r
            r = await s.one(request_for(route, key=ALICE, extra=FOREIGN))
            assert_admin_answer(r, 403, "forbidden")
            r = await s.one(request_for(route, key="sk-nobody-0123456789abcdef"))
            assert_admin_answer(r, 401, "invalid_api_key")
            forged = b"Cookie: llamagw_session=" + b"A" * 43 + b"\r\n"
            r = await s.one(request_for(route, extra=forged))
            assert_admin_answer(r, 401, "unauthorized")
            # a session cookie next to an inference key: the key decides
            r = await s.one(request_for(route, key=ALICE, extra=session.headers()))
            assert_admin_answer(r, 403, "forbidden")


@aio
async def test_every_state_change_on_a_session_needs_its_csrf_token_and_our_origin(tmp_path):
    async with Stack(tmp_path, CORS_ENV) as s:
        await admin_stack(s)
        session = await sign_in(s)
        for route in STATE_CHANGES:
            r = await s.one(spost(route.path, {}, session, csrf=False))
            assert_admin_answer(r, 403, "csrf")
            wrong = f"Cookie: {session.cookie}\r\nX-CSRF-Token: {'x' * 43}\r\n".encode()
            r = await s.one(post(route.path, {}, key=None, extra=wrong))
            assert_admin_answer(r, 403, "csrf")
            for foreign in (FOREIGN, b"Sec-Fetch-Site: cross-site\r\n",
                            b"Sec-Fetch-Site: same-site\r\n", b"Origin: null\r\n"):
                r = await s.one(spost(route.path, {}, session, extra=foreign))
                assert_admin_answer(r, 403, "csrf")
        # the session is still good, and an admin key needs no token
        r = await s.one(sget("/admin/session", session))
        assert r.status == 200 and r.json()["csrf"] == session.csrf
        r = await s.one(post("/admin/keys/rotate", {"key_id": "nobody"}, key=OPS))
        assert_admin_answer(r, 404, "key_not_found")
        # our own page: its Origin, or Sec-Fetch-Site same-origin
        same = b"Origin: http://gw\r\nSec-Fetch-Site: same-origin\r\n"
        r = await s.one(spost("/admin/keys/rotate", {"key_id": "nobody"}, session, extra=same))
        assert_admin_answer(r, 404, "key_not_found")


@aio
async def test_an_admin_session_or_key_gets_every_read_route(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        session = await sign_in(s)
        for route in GUARDED:
            if route.method != "GET":
                continue
            if route.streams:
                for sse in (await SSE.open(s, session), await SSE.open(s, key=OPS)):
                    assert sse.status == 200 and (await sse.event())[0] == "hello"
                    sse.client.abort()
                continue
            for raw in (sget(route.path, session), get(route.path, key=OPS)):
                r = await s.one(raw)
                assert_admin_answer(r, 200)
                assert r.get("cache-control") == "no-store", r


@aio
async def test_no_cors_on_admin_routes_and_no_preflight(tmp_path):
    async with Stack(tmp_path, CORS_ENV) as s:
        await admin_stack(s)
        pre = FOREIGN + b"Access-Control-Request-Method: POST\r\n"
        for path in {r.path for r in routes.ADMIN_ROUTES} | {"/ui/", "/admin/nothing"}:
            r = await s.one(get(path, key=None, method=b"OPTIONS", extra=pre))
            assert r.status in (204, 404), r
            assert not [n for n, _ in r.headers if n.startswith("access-control-")], r
        r = await s.one(get("/admin/keys", key=OPS, extra=FOREIGN))
        assert_admin_answer(r, 200)
        # the inference API keeps its CORS
        r = await s.one(get("/v1/models", extra=FOREIGN))
        assert r.get("access-control-allow-origin") == "https://evil.example"


# ---------------------------------------------------------------------------------- sign-in
@aio
async def test_sign_in_gives_an_opaque_httponly_strict_cookie_and_sign_out_revokes_it(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        r = await s.one(post("/admin/session", {"key": OPS}, key=None))
        assert_admin_answer(r, 200)
        cookie = r.get("set-cookie")
        assert re.fullmatch(r"llamagw_session=[A-Za-z0-9_-]{43}; Path=/; HttpOnly; "
                            r"SameSite=Strict", cookie), cookie
        body = r.json()
        assert set(body) == {"csrf", "key_id", "expires_in"} and body["key_id"] == "ops"
        assert 0 < body["expires_in"] <= 1800
        assert OPS.encode() not in r.raw
        session = await sign_in(s)
        assert session.cookie != cookie.split(";")[0]       # a new session each time
        r = await s.one(sget("/admin/session", session))
        assert r.json() == {"key_id": "ops", "csrf": session.csrf,
                            "expires_in": r.json()["expires_in"]}
        r = await s.one(spost("/admin/session/logout", {}, session))
        assert r.status == 204 and "Max-Age=0" in r.get("set-cookie")
        for path in ("/admin/session", "/admin/keys", "/admin/system"):
            assert_admin_answer(await s.one(sget(path, session)), 401, "unauthorized")
        assert (await SSE.open(s, session)).status == 401


@aio
async def test_secure_cookie_behind_an_https_proxy(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        r = await s.one(post("/admin/session", {"key": OPS}, key=None,
                             extra=b"X-Forwarded-Proto: https\r\n"))
        assert r.status == 200 and r.get("set-cookie").endswith("; Secure")
        # an https page of this host posting to the plain-http gateway behind the proxy
        session = await sign_in(s, extra=b"X-Forwarded-Proto: https\r\nOrigin: https://gw\r\n")
        r = await s.one(spost("/admin/session/logout", {}, session,
                              extra=b"X-Forwarded-Proto: https\r\nOrigin: https://gw\r\n"))
        assert r.status == 204 and r.get("set-cookie").endswith("; Secure")


@aio
async def test_inference_and_unknown_keys_cannot_sign_in(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        r = await s.one(post("/admin/session", {"key": ALICE}, key=None))
        assert_admin_answer(r, 403, "not_admin")
        assert r.get("set-cookie") is None
        for bad in ({"key": "sk-nobody-0123456789abcdef"}, {"key": 12}, {}, {"key": ""}):
            r = await s.one(post("/admin/session", bad, key=None))
            assert_admin_answer(r, 401, "unauthorized")
            assert r.get("set-cookie") is None
        r = await s.one(post("/admin/session", b"[1]", key=None))
        assert r.status == 400
        r = await s.one(post("/admin/session", {"key": OPS}, key=None, extra=FOREIGN))
        assert_admin_answer(r, 403, "csrf")


@aio
async def test_sign_in_failures_are_rate_limited_per_client(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        limit = s.gw.admission.admin.limiter.per_client
        for _ in range(limit):
            r = await s.one(post("/admin/session", {"key": BOB}, key=None))
            assert r.status == 403
        r = await s.one(post("/admin/session", {"key": OPS}, key=None))
        assert_admin_answer(r, 429, "rate_limited")
        assert 1 <= int(r.get("retry-after")) <= 60 and r.get("set-cookie") is None


@aio
async def test_setup_says_whether_an_admin_key_exists(tmp_path):
    async with Stack(tmp_path) as s:
        r = await s.one(get("/admin/setup", key=None))
        assert_admin_answer(r, 200)
        assert r.json()["admin_keys"] is False and "--role admin" in r.json()["add_admin_key"]
        await admin_stack(s)
        assert (await s.one(get("/admin/setup", key=None))).json()["admin_keys"] is True


@aio
async def test_a_demoted_or_removed_admin_key_loses_its_sessions_at_the_reload(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        ops, ops2 = await sign_in(s, OPS), await sign_in(s, OPS2)
        path = s.config.auth_keys_file
        keyfile.update_key(path, "ops", {"role": None})          # as `keys.py set` would
        s.gw.reload_keys()
        assert (await s.one(sget("/admin/keys", ops))).status == 401
        assert (await s.one(sget("/admin/keys", ops2))).status == 200
        keyfile.rotate_key(path, "ops2")                           # rotated outside the API
        s.gw.reload_keys()
        assert (await s.one(sget("/admin/keys", ops2))).status == 401
        assert len(s.gw.admission.admin.sessions) == 0


# ------------------------------------------------------------------------------------- keys
@aio
async def test_keys_create_list_rotate_revoke(tmp_path, caplog):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        session = await sign_in(s)
        assert (await s.one(post("/v1/chat/completions", chat(), key=ALICE))).status == 200
        body = {"key_id": "carl", "rpm": 7, "models": ["demo"], "tpm": 5000}
        with caplog.at_level(logging.INFO, logger="gateway"):
            r = await s.one(spost("/admin/keys", body, session))
        assert_admin_answer(r, 201)
        secret = r.json()["secret"]
        assert r.json()["key_id"] == "carl" and secret.startswith("sk-")
        assert secret not in caplog.text and "created by 'ops'" in caplog.text
        # it works at once, with its settings, and the file holds only its hash
        r = await s.one(post("/v1/chat/completions", chat(), key=secret))
        assert r.status == 200 and r.get("x-ratelimit-limit") == "7"
        assert secret not in Path(s.config.auth_keys_file).read_text()
        r = await s.one(sget("/admin/keys", session))
        listed = {k["key_id"]: k for k in r.json()["keys"]}
        assert secret.encode() not in r.raw and OPS.encode() not in r.raw
        assert listed["carl"] == {"key_id": "carl", "role": "user", "rpm": 7,
                                  "concurrency": None, "tpm": 5000, "tpd": None,
                                  "models": ["demo"], "hashed": True,
                                  "last_used": listed["carl"]["last_used"]}
        assert listed["alice"]["last_used"] > 0 and listed["bob"]["last_used"] is None
        assert listed["ops"]["role"] == "admin" and listed["alice"]["hashed"] is False
        # rotate: the old secret stops, the new one works
        r = await s.one(spost("/admin/keys/rotate", {"key_id": "carl"}, session))
        assert_admin_answer(r, 200)
        new = r.json()["secret"]
        assert new != secret
        assert (await s.one(post("/v1/chat/completions", chat(), key=secret))).status == 401
        assert (await s.one(post("/v1/chat/completions", chat(), key=new))).status == 200
        # revoke
        r = await s.one(spost("/admin/keys/revoke", {"key_id": "carl"}, session))
        assert_admin_answer(r, 200)
        assert r.json() == {"key_id": "carl"}
        assert (await s.one(post("/v1/chat/completions", chat(), key=new))).status == 401


@aio
async def test_key_edits_refuse_bad_input_and_keep_the_last_admin(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        before = Path(s.config.auth_keys_file).read_text()
        for body, code in (({"key_id": "alice"}, "key_exists"),
                           ({"key_id": "bad id"}, "invalid_key_id"),
                           ({"key_id": "x", "rpm": 0}, "invalid_setting"),
                           ({"key_id": "x", "rpm": "5"}, "invalid_setting"),
                           ({"key_id": "x", "role": "root"}, "invalid_setting"),
                           ({"key_id": "x", "models": ["a,b"]}, "invalid_setting"),
                           ({"key_id": "x", "secret": "sk-mine"}, "invalid_field"),
                           ({"key_id": "x", "hashed": "no"}, "invalid_setting")):
            r = await s.one(post("/admin/keys", body, key=OPS))
            assert_admin_answer(r, 409 if code == "key_exists" else 400, code)
        for action in ("rotate", "revoke"):
            r = await s.one(post(f"/admin/keys/{action}", {"key_id": "nobody"}, key=OPS))
            assert_admin_answer(r, 404, "key_not_found")
        assert Path(s.config.auth_keys_file).read_text() == before
        # the last admin key stays
        r = await s.one(post("/admin/keys/revoke", {"key_id": "ops2"}, key=OPS))
        assert r.status == 200
        r = await s.one(post("/admin/keys/revoke", {"key_id": "ops"}, key=OPS))
        assert_admin_answer(r, 409, "last_admin_key")
        # an admin key made here can sign in; revoking it ends its session
        r = await s.one(post("/admin/keys", {"key_id": "ops3", "role": "admin",
                                             "hashed": False}, key=OPS))
        ops3 = await sign_in(s, r.json()["secret"])
        assert (await s.one(sget("/admin/keys", ops3))).status == 200
        r = await s.one(post("/admin/keys/revoke", {"key_id": "ops3"}, key=OPS))
        assert r.status == 200
        assert (await s.one(sget("/admin/keys", ops3))).status == 401


@aio
async def test_rotating_an_admin_key_ends_its_sessions(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        ops, ops2 = await sign_in(s, OPS), await sign_in(s, OPS2)
        sse = await SSE.open(s, ops)
        r = await s.one(spost("/admin/keys/rotate", {"key_id": "ops"}, ops2))
        assert r.status == 200
        assert (await s.one(sget("/admin/session", ops))).status == 401
        assert (await s.one(sget("/admin/session", ops2))).status == 200
        assert (await s.one(get("/admin/keys", key=OPS))).status == 401
        assert (await s.one(get("/admin/keys", key=r.json()["secret"]))).status == 200
        sse.client.abort()


@aio
async def test_without_auth_the_admin_api_still_needs_an_admin_key(tmp_path):
    async with Stack(tmp_path, {"AUTH_ENABLED": "false"}) as s:
        await admin_stack(s)
        assert (await s.one(get("/v1/models", key=None))).status == 200
        assert (await s.one(get("/admin/keys", key=None))).status == 401
        assert (await s.one(get("/admin/keys", key=ALICE))).status == 403
        session = await sign_in(s)
        assert (await s.one(sget("/admin/keys", session))).status == 200


# ------------------------------------------------------------------------- dashboard files
@aio
async def test_the_dashboard_files_are_served_open_with_their_headers(tmp_path):
    async with Stack(tmp_path, CORS_ENV) as s:
        r = await s.one(get("/ui", key=None))
        assert r.status == 308 and r.get("location") == "/ui/"
        r = await s.one(get("/ui/", key=None, extra=FOREIGN))
        assert r.status == 200 and r.get("content-type").startswith("text/html")
        assert "require-trusted-types-for 'script'" in r.get("content-security-policy")
        assert r.get("x-content-type-options") == "nosniff"
        assert r.get("referrer-policy") == "no-referrer" and r.get("etag")
        assert int(r.get("content-length")) == len(r.body) and b"app.js" in r.body
        assert not [n for n, _ in r.headers if n.startswith("access-control-")]
        etag = r.get("etag")
        r = await s.one(get("/ui/", key=None, extra=f"If-None-Match: {etag}\r\n".encode()))
        assert r.status == 304 and r.get("content-length") is None and r.get("etag") == etag
        for name in ("app.js", "style.css", "favicon.svg", "index.html"):
            r = await s.one(get("/ui/" + name, key=None))
            assert r.status == 200 and r.body, name
            head = await s.one(get("/ui/" + name, key=None, method=b"HEAD"),
                               head_request=True)
            assert head.status == 200 and head.get("content-length") == str(len(r.body))
        r = await s.one(get("/favicon.ico", key=None))
        assert r.status == 308 and r.get("location") == "/ui/favicon.svg"
        r = await s.one(post("/ui/", {}, key=None))
        assert r.status == 405 and r.get("allow") == "GET, HEAD"
        r = await s.one(get("/ui/../keys.txt", key=None))
        assert r.status == 404 and r.error()["code"] == "not_found"


def test_the_version_is_pyprojects():
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert plane.VERSION == project["project"]["version"]


@aio
async def test_shutdown_ends_the_live_streams_first(tmp_path):
    s = Stack(tmp_path)
    await s.__aenter__()
    try:
        await admin_stack(s)
        sse = await SSE.open(s, await sign_in(s))
        assert (await sse.event())[0] == "hello"
        shutdown = asyncio.create_task(s.gw.shutdown(2.0))
        while (await sse.event(2.0))[0]:
            pass                                    # the stream ends with its last chunk
        await asyncio.wait_for(shutdown, 2.0)
        assert len(s.gw.admin.hub) == 0
    finally:
        s.gw = None
        await s.__aexit__(None, None, None)


def test_keys_holds_is_by_id_and_secret(tmp_path):
    path = tmp_path / "k.txt"
    path.write_text(ADMIN_KEY_FILE)
    path.chmod(0o600)
    store = keys.KeyStore(str(path))
    store.load()
    digest = keys._digest(OPS)
    assert store.holds("ops", digest) and not store.holds("ops2", digest)
    assert not store.holds("ops", keys._digest(OPS2))

