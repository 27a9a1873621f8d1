"""llamagw.admin.sessions and llamagw.admin.origin: sessions, expiry, bounds, CSRF, the cookie,
the sign-in limiter, the same-origin check. Pure code with an injected clock."""

from __future__ import annotations

import re

import pytest

from llamagw.admin import origin, sessions
from llamagw.admin.sessions import SessionStore, SignInLimiter


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- sessions ---------------------------------------------------------------------------------
def test_a_session_id_is_opaque_random_and_only_its_hash_is_kept():
    store = SessionStore(clock=Clock())
    ids = {store.create("ops")[0] for _ in range(20)}
    assert len(ids) == 20
    for sid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", sid)
        assert "ops" not in sid
    table = repr(vars(store))
    assert not any(sid in table for sid in ids)


def test_get_returns_the_session_and_refreshes_it():
    clock = Clock()
    store = SessionStore(clock=clock, idle_s=100, absolute_s=1000)
    sid, session = store.create("ops")
    clock.t += 99
    assert store.get(sid) is session
    assert session.last_seen == clock.t
    clock.t += 99                      # 99 s after the last use: still alive
    assert store.get(sid) is session
    assert store.get("x" + sid[1:]) is None
    assert store.get("") is None and store.get(None) is None
    assert store.get("bad id!") is None


def test_idle_expiry():
    clock = Clock()
    store = SessionStore(clock=clock, idle_s=100, absolute_s=1000)
    sid, _ = store.create("ops")
    clock.t += 100
    assert store.get(sid) is None
    assert len(store) == 0


def test_absolute_expiry_even_when_used():
    clock = Clock()
    store = SessionStore(clock=clock, idle_s=100, absolute_s=250)
    sid, session = store.create("ops")
    for _ in range(2):
        clock.t += 90
        assert store.get(sid) is session
    assert store.expires_in(session) == 70     # the absolute bound comes first
    clock.t += 70
    assert store.get(sid) is None


def test_defaults_are_thirty_minutes_idle_and_twelve_hours():
    clock = Clock()
    store = SessionStore(clock=clock)
    sid, session = store.create("ops")
    assert store.expires_in(session) == 30 * 60
    for _ in range(24):                # used every 29 min: 696 min in all
        clock.t += 29 * 60
        assert store.get(sid) is session, clock.t
    clock.t += 24 * 60                 # idle 24 min only, but 12 h since sign-in
    assert store.get(sid) is None


def test_the_number_of_sessions_is_bounded_oldest_dropped():
    store = SessionStore(clock=Clock(), max_sessions=3)
    sids = [store.create(f"k{i}")[0] for i in range(5)]
    assert len(store) == 3
    assert store.dropped == 2
    assert [store.get(s) is not None for s in sids] == [False, False, True, True, True]


def test_expired_sessions_are_pruned_before_dropping_live_ones():
    clock = Clock()
    store = SessionStore(clock=clock, idle_s=10, max_sessions=2)
    old, _ = store.create("a")
    clock.t += 5
    live, _ = store.create("b")
    clock.t += 6                       # `old` idle 11 s: expired; `live` 6 s
    new, _ = store.create("c")
    assert store.dropped == 0
    assert store.get(live) is not None and store.get(new) is not None


def test_revoke_and_revoke_key():
    store = SessionStore(clock=Clock())
    a1, _ = store.create("alice")
    a2, _ = store.create("alice")
    b, _ = store.create("bob")
    assert store.revoke(a1) is True
    assert store.revoke(a1) is False
    assert store.get(a1) is None
    assert store.revoke_key("alice") == 1
    assert store.get(a2) is None
    assert store.get(b) is not None
    assert store.revoke_key("nobody") == 0


def test_csrf_compare():
    store = SessionStore(clock=Clock())
    _, s1 = store.create("ops")
    _, s2 = store.create("ops")
    assert s1.csrf != s2.csrf and len(s1.csrf) >= 43
    assert sessions.csrf_ok(s1, s1.csrf)
    assert not sessions.csrf_ok(s1, s2.csrf)
    assert not sessions.csrf_ok(s1, None)
    assert not sessions.csrf_ok(s1, "")
    assert not sessions.csrf_ok(s1, s1.csrf[:-1])
    assert not sessions.csrf_ok(s1, s1.csrf + "\u00e9")     # non-ASCII: refused, no TypeError


# --- cookie -----------------------------------------------------------------------------------
def test_cookie_header_attributes():
    sid = SessionStore(clock=Clock()).create("ops")[0]
    plain = sessions.cookie_header(sid, secure=False)
    assert plain == f"llamagw_session={sid}; Path=/; HttpOnly; SameSite=Strict"
    assert sessions.cookie_header(sid, secure=True).endswith("; Secure")
    cleared = sessions.clear_cookie_header(secure=True)
    assert cleared.startswith("llamagw_session=;") and "Max-Age=0" in cleared
    assert "HttpOnly" in cleared and "Secure" in cleared
    with pytest.raises(ValueError):
        sessions.cookie_header("a;b", secure=False)


@pytest.mark.parametrize("headers, expected", [
    ([("cookie", "llamagw_session=abc_DEF-1")], "abc_DEF-1"),
    ([("Cookie", "theme=dark; llamagw_session=abc; x=1")], "abc"),
    ([("cookie", 'llamagw_session="abc"')], "abc"),
    ([("cookie", "a=1"), ("cookie", "llamagw_session=second")], "second"),
    ([("cookie", "llamagw_session=bad value; llamagw_session=good")], "good"),
    ([("cookie", "llamagw_session=<script>")], None),
    ([("cookie", "llamagw_session=" + "a" * 129)], None),
    ([("cookie", "other_session=abc")], None),
    ([("authorization", "llamagw_session=abc")], None),
    ([], None),
])
def test_session_id_from_cookie_headers(headers, expected):
    assert sessions.session_id_from(headers) == expected


def test_request_is_https():
    assert sessions.request_is_https("https", [])
    assert not sessions.request_is_https("http", [])
    assert sessions.request_is_https("http", [("x-forwarded-proto", "https")])
    assert sessions.request_is_https("http", [("X-Forwarded-Proto", "HTTPS, http")])
    assert not sessions.request_is_https("http", [("x-forwarded-proto", "http, https")])


# --- sign-in limiter --------------------------------------------------------------------------
def test_limiter_per_client_sliding_window():
    clock = Clock()
    lim = SignInLimiter(clock=clock, per_client=3, global_limit=100, window_s=60)
    for i in range(3):
        assert lim.retry_after("1.2.3.4") == 0
        lim.failure("1.2.3.4")
        clock.t += 10
    assert lim.retry_after("1.2.3.4") == 30        # first failure at t0, now t0+30
    assert lim.retry_after("5.6.7.8") == 0         # another client is not affected
    clock.t += 29.5
    assert lim.retry_after("1.2.3.4") == 1
    clock.t += 0.5
    assert lim.retry_after("1.2.3.4") == 0
    assert lim.refused == 2


def test_limiter_global_bound():
    clock = Clock()
    lim = SignInLimiter(clock=clock, per_client=100, global_limit=5, window_s=60)
    for i in range(5):
        lim.failure(f"10.0.0.{i}")
    assert lim.retry_after("10.9.9.9") == 60
    clock.t += 60
    assert lim.retry_after("10.9.9.9") == 0


def test_limiter_table_is_bounded():
    lim = SignInLimiter(clock=Clock(), per_client=1, global_limit=10**6, max_clients=50)
    for i in range(500):
        lim.failure(f"c{i}")
    assert len(lim) == 50
    assert lim.retry_after("c499") > 0
    assert lim.retry_after("c0") == 0              # forgotten (oldest), not refused


# --- same origin ------------------------------------------------------------------------------
HOST = [("host", "127.0.0.1:8000")]


@pytest.mark.parametrize("extra, scheme, ok", [
    ([], "http", True),                                              # curl: no browser headers
    ([("origin", "http://127.0.0.1:8000")], "http", True),
    ([("origin", "http://127.0.0.1:8000"), ("sec-fetch-site", "same-origin")], "http", True),
    ([("sec-fetch-site", "none")], "http", True),
    ([("origin", "http://evil.example")], "http", False),
    ([("origin", "http://127.0.0.1:8001")], "http", False),
    ([("origin", "null")], "http", False),
    ([("origin", "http://127.0.0.1:8000/path")], "http", False),
    ([("origin", "ftp://127.0.0.1:8000")], "http", False),
    ([("sec-fetch-site", "cross-site")], "http", False),
    ([("sec-fetch-site", "same-site"), ("origin", "http://127.0.0.1:8000")], "http", False),
    ([("origin", "http://127.0.0.1:8000"), ("origin", "http://127.0.0.1:8000")], "http", False),
    ([("origin", "http://127.0.0.1:8000")], "https", False),  # an http page on an https gateway
])
def test_same_origin(extra, scheme, ok):
    assert origin.same_origin(HOST + extra, scheme=scheme) is ok


def test_same_origin_default_ports_and_case():
    assert origin.same_origin([("host", "Gateway.Example:443"),
                               ("origin", "https://gateway.example")], scheme="https")
    assert origin.same_origin([("host", "gateway.example"),
                               ("origin", "http://gateway.example:80")], scheme="http")
    assert origin.same_origin([("host", "[::1]:8000"), ("origin", "http://[::1]:8000")],
                              scheme="http")
    assert not origin.same_origin([("host", "gateway.example"),
                                   ("origin", "https://gateway.example.evil")], scheme="https")


def test_same_origin_behind_a_tls_proxy():
    # RunPod's proxy ends TLS: the gateway sees http, the page's origin is https
    assert origin.same_origin([("host", "abc-8000.proxy.example"),
                               ("origin", "https://abc-8000.proxy.example")], scheme="http")
    # the proxy rewrote Host but says which one the browser used
    assert origin.same_origin([("host", "10.1.2.3:8000"),
                               ("x-forwarded-host", "abc-8000.proxy.example"),
                               ("x-forwarded-proto", "https"),
                               ("origin", "https://abc-8000.proxy.example")], scheme="http")
    assert not origin.same_origin([("host", "10.1.2.3:8000"),
                                   ("x-forwarded-host", "abc-8000.proxy.example"),
                                   ("origin", "https://evil.example")], scheme="http")


def test_normalize_host_refuses_junk():
    for bad in ("", "a/b", "user@host", "host:port", "[::1", "[::1]x", "h:1:2", "x" * 400):
        assert origin.normalize_host(bad, "http") is None, bad
    assert origin.normalize_host("H:08000", "http") == "h:8000"
