"""http11: sans-IO parsers and serializers.

Every raw request case runs three ways (FEEDS): whole, one byte per feed(), and with a second
valid request appended (which must then parse too when the first one is valid).
"""

from __future__ import annotations

import random
import time

import pytest

from llamagw.errors import ProtocolError
from llamagw.wire import grammar, http11, request, response
from llamagw.wire.http11 import (
    CONTINUE_100, END_OF_MESSAGE, LAST_CHUNK, NEED_DATA, Data, EndOfMessage, Request,
    RequestParser, Response, ResponseParser, chunk, request_head, response_head,
)

MAX_BODY = 1000
SECOND = b"GET /second HTTP/1.1\r\nHost: example\r\n\r\n"
SECOND_EVENTS = [("req", "GET", "/second"), ("end",)]
H = b"Host: a\r\n"   # shorthand for the Host header HTTP/1.1 requires


# --- harness ------------------------------------------------------------------------------
def drain(parser, events):
    for _ in range(100_000):   # bounded: a parser that never says NEED_DATA fails the test
        ev = parser.next_event()
        if ev is NEED_DATA:
            return
        check_in_body(parser, ev)
        events.append(ev)
    raise AssertionError("parser never returned NEED_DATA")


def check_in_body(parser, ev):
    if isinstance(ev, (Request, Response)) or isinstance(ev, Data):
        assert parser.in_body
    elif isinstance(ev, EndOfMessage):
        assert not parser.in_body


def run(parser, pieces, eof=True):
    events = []
    for piece in pieces:
        parser.feed(piece)
        drain(parser, events)
    if eof:
        parser.feed_eof()
        drain(parser, events)
    return events


def summary(events):
    """Requests/responses -> tuples, adjacent Data merged (piece sizes depend on the feed)."""
    out = []
    for ev in events:
        if isinstance(ev, Request):
            out.append(("req", ev.method, ev.target))
        elif isinstance(ev, Response):
            out.append(("resp", ev.status))
        elif isinstance(ev, Data):
            assert isinstance(ev.data, bytes) and ev.data
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + ev.data)
            else:
                out.append(("data", ev.data))
        else:
            assert ev is END_OF_MESSAGE
            out.append(("end",))
    return out


def bytewise(raw):
    return [raw[i:i + 1] for i in range(len(raw))]


FEEDS = ["whole", "bytewise", "pipelined"]


def feed_request(raw, how, **kw):
    parser = RequestParser(kw.pop("max_body_size", MAX_BODY), **kw)
    if how == "whole":
        return run(parser, [raw])
    if how == "bytewise":
        return run(parser, bytewise(raw))
    return run(parser, [raw + SECOND])


def parse_one(raw, **kw):
    events = feed_request(raw, "whole", **kw)
    assert isinstance(events[0], Request)
    assert events[-1] is END_OF_MESSAGE
    return events[0]


# --- valid requests -----------------------------------------------------------------------
VALID = [
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"\r\n", [("req", "GET", "/"), ("end",)],
                 id="minimal-get"),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", [("req", "GET", "/"), ("end",)], id="http10-no-host"),
    pytest.param(b"HEAD /x HTTP/1.1\r\n" + H + b"\r\n", [("req", "HEAD", "/x"), ("end",)],
                 id="head"),
    pytest.param(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", [("req", "OPTIONS", "*"), ("end",)],
                 id="options-asterisk"),
    pytest.param(b"GET /v1/models?x=1&y=%20 HTTP/1.1\r\n" + H + b"\r\n",
                 [("req", "GET", "/v1/models?x=1&y=%20"), ("end",)], id="query"),
    pytest.param(b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", [("req", "GET", "/"), ("end",)],
                 id="leading-empty-lines"),
    pytest.param(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
                 [("req", "POST", "/p"), ("data", b"hello"), ("end",)], id="content-length"),
    pytest.param(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
                 [("req", "POST", "/p"), ("end",)], id="content-length-zero"),
    pytest.param(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 000012\r\n\r\nhello world!",
                 [("req", "POST", "/p"), ("data", b"hello world!"), ("end",)],
                 id="content-length-leading-zeros"),
    pytest.param(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length:  \t5 \t\r\n\r\nhello",
                 [("req", "POST", "/p"), ("data", b"hello"), ("end",)], id="content-length-ows"),
    pytest.param(b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n1;ext\r\n \r\nA;a=b;c=\"q \\\"x\\\"\" ; d = e\r\n0123456789\r\n"
                 b"0\r\nX-Trailer: t\r\nY: u\r\n\r\n",
                 [("req", "POST", "/c"), ("data", b"hello 0123456789"), ("end",)],
                 id="chunked-ext-trailers"),
    pytest.param(b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: CHUNKED\r\n\r\n"
                 b"0000000000000003\r\nabc\r\n000\r\n\r\n",
                 [("req", "POST", "/c"), ("data", b"abc"), ("end",)], id="chunked-uppercase"),
    pytest.param(b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 [("req", "POST", "/c"), ("end",)], id="chunked-empty"),
    # RFC 9112 6.3: no Content-Length and no Transfer-Encoding -> body length 0; what follows is
    # the next request.
    pytest.param(b"POST /nobody HTTP/1.1\r\n" + H + b"\r\nGET /next HTTP/1.1\r\n" + H + b"\r\n",
                 [("req", "POST", "/nobody"), ("end",), ("req", "GET", "/next"), ("end",)],
                 id="no-framing-means-empty-body"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: \r\n\r\n", [("req", "GET", "/"), ("end",)],
                 id="empty-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", [("req", "GET", "/"), ("end",)],
                 id="ipv6-host"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X-Obs: caf\xe9\r\nX-Empty:\r\n\r\n",
                 [("req", "GET", "/"), ("end",)], id="obs-text-and-empty-value"),
    pytest.param(b"DELETE /d HTTP/1.1\r\n" + H + b"\r\n", [("req", "DELETE", "/d"), ("end",)],
                 id="delete"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X: " + b"v" * 9000 + b"\r\n\r\n",
                 [("req", "GET", "/"), ("end",)], id="long-header-value"),
    pytest.param(b"GET /" + b"a" * (http11.MAX_TARGET_LENGTH - 1) + b" HTTP/1.1\r\n" + H
                 + b"\r\n", [("req", "GET", "/" + "a" * (http11.MAX_TARGET_LENGTH - 1)),
                             ("end",)], id="target-at-limit"),
    # RFC 3986 characters a request-target may hold, pct-encoding included
    pytest.param(b"GET /a-._~!$&'()*+,;=:@%2F%aF/?q=/?:@&x HTTP/1.1\r\n" + H + b"\r\n",
                 [("req", "GET", "/a-._~!$&'()*+,;=:@%2F%aF/?q=/?:@&x"), ("end",)],
                 id="target-all-rfc3986-characters"),
    # RFC 9112 3.2.2: a server MUST accept the absolute-form
    pytest.param(b"GET http://a/v1/models?x=1 HTTP/1.1\r\n" + H + b"\r\n",
                 [("req", "GET", "http://a/v1/models?x=1"), ("end",)], id="absolute-form"),
    pytest.param(b"GET HTTPS://[::1]:8000 HTTP/1.1\r\n" + H + b"\r\n",
                 [("req", "GET", "HTTPS://[::1]:8000"), ("end",)], id="absolute-form-no-path"),
    pytest.param(b"GET http://a/x HTTP/1.0\r\n\r\n", [("req", "GET", "http://a/x"), ("end",)],
                 id="absolute-form-http10-no-host"),
    # RFC 9110 2.5: a higher minor version of HTTP/1 is processed as HTTP/1.1
    pytest.param(b"GET / HTTP/1.2\r\n" + H + b"\r\n", [("req", "GET", "/"), ("end",)],
                 id="http1.2-as-1.1"),
    # 1*DIGIT / 1*HEXDIG: leading zeros do not count against the digit limits
    pytest.param(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: " + b"0" * 30 + b"5\r\n\r\n"
                 b"hello", [("req", "POST", "/p"), ("data", b"hello"), ("end",)],
                 id="content-length-many-leading-zeros"),
    pytest.param(b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                 + b"0" * 30 + b"5\r\nhello\r\n" + b"0" * 30 + b"\r\n\r\n",
                 [("req", "POST", "/c"), ("data", b"hello"), ("end",)],
                 id="chunk-size-many-leading-zeros"),
    # RFC 9110 5.6.1: empty list elements are accepted and ignored; 5.3: field lines combine
    *(pytest.param(b"POST /c HTTP/1.1\r\n" + H + te_lines + b"\r\n0\r\n\r\n",
                   [("req", "POST", "/c"), ("end",)], id=f"te-list-{te_lines!r}")
      for te_lines in (b"Transfer-Encoding: chunked,,\r\n", b"Transfer-Encoding: , chunked\r\n",
                       b"Transfer-Encoding: chunked , \t,\r\n",
                       b"Transfer-Encoding: ,\r\nTransfer-Encoding: chunked\r\n")),
]


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("raw,expected", VALID)
def test_valid_request(raw, expected, how):
    events = feed_request(raw, how)
    if how == "pipelined":
        expected = expected + SECOND_EVENTS
    assert summary(events) == expected


# --- invalid requests: (raw, status, code) ------------------------------------------------
BAD = "bad_request"
INCOMPLETE = "incomplete_request"
HV = "http_version_not_supported"
MNI = "method_not_implemented"
UTC = "unsupported_transfer_coding"
TOO_LARGE = "header_too_large"


def req(headers=b"", line=b"POST / HTTP/1.1", body=b""):
    return line + b"\r\n" + H + headers + b"\r\n" + body


def te(value):
    return req(b"Transfer-Encoding: " + value + b"\r\n")


def cl(value):
    return req(b"Content-Length: " + value + b"\r\n", body=b"hello")


def chunked(body):
    return req(b"Transfer-Encoding: chunked\r\n", body=body)


INVALID = [
    # request line
    pytest.param(b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="double-space"),
    pytest.param(b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400, BAD, id="trailing-space"),
    pytest.param(b" GET / HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="leading-space"),
    pytest.param(b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="tab-separator"),
    pytest.param(b"GET /\r\n" + H + b"\r\n", 400, BAD, id="missing-version"),
    pytest.param(b"GET\r\n" + H + b"\r\n", 400, BAD, id="method-only"),
    pytest.param(b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="method-not-token"),
    pytest.param(b"TRACE / HTTP/1.1\r\n" + H + b"\r\n", 501, MNI, id="trace"),
    pytest.param(b"CONNECT example.com:443 HTTP/1.1\r\n" + H + b"\r\n", 501, MNI, id="connect"),
    pytest.param(b"FOO / HTTP/1.1\r\n" + H + b"\r\n", 501, MNI, id="unknown-method"),
    pytest.param(b"get / HTTP/1.1\r\n" + H + b"\r\n", 501, MNI, id="lowercase-method"),
    pytest.param(b"A" * 40 + b" / HTTP/1.1\r\n" + H + b"\r\n", 501, MNI, id="long-method"),
    # absolute-form: http(s) with a host, no userinfo (RFC 9110 4.2.1, 4.2.4)
    *(pytest.param(b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n", 400, BAD,
                   id=f"absolute-form-{target!r}") for target in (
        b"http://u@a/", b"http://u:p@a/", b"http:///x", b"http://:80/", b"ftp://a/",
        b"http:/a/", b"http:a/", b"http://a:8x/", b"http://a b/", b"http://a/%zz",
        b"h~p://a/", b"http://[::1/", b"http://[::g]/")),
    # characters outside RFC 3986, or a % not followed by two hex digits
    *(pytest.param(b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n", 400, BAD,
                   id=f"target-char-{target!r}") for target in (
        b'/a"b', b"/a<b", b"/a>b", b"/a{b}", b"/a|b", b"/a\\b", b"/a^b", b"/a`b", b"/a[b]",
        b"/?q={x}", b"/%zz", b"/%4", b"/a%", b"/%%41")),
    pytest.param(b"GET a.example:80 HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="authority-form"),
    pytest.param(b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="asterisk-not-options"),
    pytest.param(b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="target-del"),
    pytest.param(b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="target-nul"),
    pytest.param(b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="target-ctl"),
    pytest.param(b"GET /caf\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="target-non-ascii"),
    pytest.param(b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="target-fragment"),
    pytest.param(b"GET /" + b"a" * http11.MAX_TARGET_LENGTH + b" HTTP/1.1\r\n" + H + b"\r\n",
                 414, "uri_too_long", id="target-too-long"),
    # version
    pytest.param(b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, HV, id="http2.0"),
    pytest.param(b"GET / HTTP/2\r\n" + H + b"\r\n", 505, HV, id="http2"),
    pytest.param(b"GET / HTTP/3.0\r\n" + H + b"\r\n", 505, HV, id="http3.0"),
    pytest.param(b"GET / HTTP/1.1x\r\n" + H + b"\r\n", 400, BAD, id="version-suffix"),
    pytest.param(b"GET / http/1.1\r\n" + H + b"\r\n", 400, BAD, id="version-lowercase"),
    pytest.param(b"GET / HTTP/1\r\n" + H + b"\r\n", 400, BAD, id="version-no-minor"),
    pytest.param(b"GET / HTTP/1.01\r\n" + H + b"\r\n", 400, BAD, id="version-two-digit-minor"),
    pytest.param(b"GET / HTTP/0.9\r\n" + H + b"\r\n", 400, BAD, id="http0.9"),
    pytest.param(b"GET / HTTP/10.0\r\n" + H + b"\r\n", 400, BAD, id="version-two-digit-major"),
    # line endings
    pytest.param(b"GET / HTTP/1.1\n" + H + b"\r\n", 400, BAD, id="bare-lf-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400, BAD, id="bare-lf-header"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 400, BAD, id="lf-only-head"),
    pytest.param(b"GET / HTTP/1.1\r" + H + b"\r\n", 400, BAD, id="bare-cr-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400, BAD, id="bare-cr-header"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400, BAD, id="cr-in-value"),
    # a bare LF/CR between two fields of a complete head must not let the second one through
    pytest.param(b"GET / HTTP/1.1\r\nX: b\nHost: a\r\n\r\n", 400, BAD, id="bare-lf-hides-host"),
    pytest.param(b"GET / HTTP/1.1\r\nX: b\rHost: a\r\n\r\n", 400, BAD, id="bare-cr-hides-host"),
    pytest.param(req(b"X: b\nContent-Length: 5\r\n", body=b"hello"), 400, BAD,
                 id="bare-lf-hides-content-length"),
    # refused as soon as seen, not reported as an incomplete request at EOF
    pytest.param(b"GET / HTTP/1.1\r" + H, 400, BAD, id="bare-cr-unterminated-head"),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\nb", 400, BAD, id="bare-lf-unterminated-head"),
    pytest.param(b"\nGET / HTTP/1.1\r\n" + H + b"\r\n", 400, BAD, id="leading-bare-lf"),
    pytest.param(b"\r\n" * 5 + b"GET / HTTP/1.1\r\n" + H + b"\r\n", 400, BAD,
                 id="too-many-leading-empty-lines"),
    # header fields
    pytest.param(req(b"Bad Name: x\r\n"), 400, BAD, id="space-in-name"),
    pytest.param(req(b"X-A : x\r\n"), 400, BAD, id="space-before-colon"),
    pytest.param(req(b"X-A\t: x\r\n"), 400, BAD, id="tab-before-colon"),
    pytest.param(req(b"X-A: x\r\n folded\r\n"), 400, BAD, id="obs-fold-space"),
    pytest.param(req(b"X-A: x\r\n\tfolded\r\n"), 400, BAD, id="obs-fold-tab"),
    pytest.param(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400, BAD, id="first-header-folded"),
    pytest.param(req(b"X-A: a\x00b\r\n"), 400, BAD, id="nul-in-value"),
    pytest.param(req(b"X-A: a\x01b\r\n"), 400, BAD, id="ctl-in-value"),
    pytest.param(req(b"X-A: a\x7fb\r\n"), 400, BAD, id="del-in-value"),
    pytest.param(req(b": x\r\n"), 400, BAD, id="empty-name"),
    pytest.param(req(b"NoColon\r\n"), 400, BAD, id="no-colon"),
    pytest.param(req(b"X(A): x\r\n"), 400, BAD, id="name-not-token"),
    pytest.param(req(b"X-\xe9: x\r\n"), 400, BAD, id="name-non-ascii"),
    # Host
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, BAD, id="http11-no-host"),
    # RFC 9112 3.2: Host is required of HTTP/1.1 whatever the form of the request-target
    pytest.param(b"GET http://a/ HTTP/1.1\r\n\r\n", 400, BAD, id="http11-absolute-form-no-host"),
    pytest.param(b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400, BAD, id="http11-no-host-other-header"),
    pytest.param(req(b"Host: b\r\n"), 400, BAD, id="two-hosts"),
    pytest.param(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400, BAD, id="two-hosts-1.0"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, BAD, id="host-slash"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400, BAD, id="host-userinfo"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, BAD, id="host-space"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n", 400, BAD, id="host-bad-port"),
    *(pytest.param(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 400, BAD,
                   id=f"host-{host!r}") for host in (
        b"a%zz", b"a%4", b"%", b"[::::]", b"[1::2::3]", b"[::1", b"::1", b"[::1]x",
        b"[v1.x", b"a:1:2")),
    # Content-Length
    *(pytest.param(cl(v), 400, BAD, id=f"cl-{v!r}") for v in (
        b"+5", b"-1", b"5_0", b"0x5", b"5 5", b"5,5", b"5, 5", b"", b"5.0", b"\xb2", b"\xb25",
        b"\xd9\xa5")),
    # a valid 1*DIGIT too long to be allowed is too large, not malformed (and not int()-ed)
    pytest.param(cl(b"1" * 19), 413, "body_too_large", id="cl-19-digits"),
    pytest.param(cl(b"9" * 20000), 413, "body_too_large", id="cl-20000-digits"),
    pytest.param(req(b"Content-Length: 5\r\nContent-Length: 5\r\n", body=b"hello"), 400, BAD,
                 id="two-cl-equal"),
    pytest.param(req(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", body=b"0\r\n\r\n"),
                 400, BAD, id="cl-and-te"),
    pytest.param(req(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", body=b"0\r\n\r\n"),
                 400, BAD, id="te-and-cl"),
    pytest.param(req(b"Content-Length: 1001\r\n"), 413, "body_too_large", id="cl-over-limit"),
    pytest.param(req(b"Content-Length: 999999999999999999\r\n"), 413, "body_too_large",
                 id="cl-18-digits-over-limit"),
    # Transfer-Encoding
    # chunked last, after codings we do not decode: 501 (RFC 9112 6.1)
    *(pytest.param(te(v), 501, UTC, id=f"te-{v!r}") for v in (
        b"gzip, chunked", b"br, chunked", b"x;q=1, chunked")),
    pytest.param(req(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"), 501, UTC,
                 id="te-two-lines-gzip-then-chunked"),
    # chunked not the final coding: the length cannot be known, 400 (RFC 9112 6.3 item 4)
    *(pytest.param(te(v), 400, BAD, id=f"te-{v!r}") for v in (
        b"gzip", b"identity", b"x", b"chunked, gzip", b"deflate", b"chunked, chunked", b"",
        b",", b" , ", b"chunked;x=1", b"gzip\x01", b"chunked, g(z)ip", b"chunked\xa0")),
    pytest.param(req(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"), 400, BAD,
                 id="two-te"),
    pytest.param(req(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n"), 400, BAD,
                 id="te-two-lines-chunked-then-gzip"),
    pytest.param(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, BAD,
                 id="te-in-http10"),
    # chunked body
    *(pytest.param(chunked(size + b"\r\nhello\r\n0\r\n\r\n"), 400, BAD, id=f"chunk-size-{size!r}")
      for size in (b"+5", b"-5", b" 5", b"5 ", b"0x5", b"5_", b"", b"g")),
    pytest.param(chunked(b"1" * 17 + b"\r\n"), 413, "body_too_large", id="chunk-size-17-digits"),
    pytest.param(chunked(b"f" * 4000 + b"\r\n"), 413, "body_too_large",
                 id="chunk-size-4000-digits"),
    *(pytest.param(chunked(b"5" + ext + b"\r\nhello\r\n0\r\n\r\n"), 400, BAD,
                   id=f"chunk-ext-{ext!r}") for ext in (
        b";", b";=x", b";a=", b";a=\"unterminated", b";a=b c", b";a b", b"x", b";a=\"\x01\"",
        b";a=(b)")),
    pytest.param(chunked(b"5;" + b"a" * http11.MAX_CHUNK_LINE + b"\r\nhello\r\n0\r\n\r\n"),
                 400, BAD, id="chunk-line-too-long"),
    pytest.param(chunked(b"5\r\nhelloXY0\r\n\r\n"), 400, BAD, id="chunk-data-no-crlf"),
    pytest.param(chunked(b"5\r\nhello\n0\r\n\r\n"), 400, BAD, id="chunk-data-bare-lf"),
    pytest.param(chunked(b"5\r\nhello\r\r\n0\r\n\r\n"), 400, BAD, id="chunk-data-cr-cr"),
    pytest.param(chunked(b"3\r\nhello\r\n0\r\n\r\n"), 400, BAD, id="chunk-longer-than-size"),
    pytest.param(chunked(b"5\nhello\r\n0\r\n\r\n"), 400, BAD, id="chunk-size-bare-lf"),
    pytest.param(chunked(b"5\r\nhello\r\n0\r\nX : y\r\n\r\n"), 400, BAD, id="trailer-bad"),
    pytest.param(chunked(b"5\r\nhello\r\n0\r\nX: y\n\r\n"), 400, BAD, id="trailer-bare-lf"),
    pytest.param(chunked(b"5\r\nhello\r\n0\r\n folded\r\n\r\n"), 400, BAD, id="trailer-fold"),
    pytest.param(chunked(b"5\r\nhello\r\n0\r\nX: " + b"t" * http11.MAX_TRAILER_BYTES
                         + b"\r\n\r\n"), 431, TOO_LARGE, id="trailer-too-large"),
    pytest.param(chunked(b"3E9\r\n"), 413, "body_too_large", id="chunk-over-limit"),
    pytest.param(chunked(b"1F4\r\n" + b"x" * 500 + b"\r\n1F5\r\n"), 413, "body_too_large",
                 id="chunks-total-over-limit"),
    pytest.param(chunked(b"FFFFFFFFFFFFFFFF\r\n"), 413, "body_too_large", id="chunk-16-hex"),
    # incomplete at EOF
    pytest.param(b"GET / HTTP/1.1\r\n" + H, 400, INCOMPLETE, id="eof-in-head"),
    pytest.param(b"GET / HTT", 400, INCOMPLETE, id="eof-in-request-line"),
    pytest.param(b"\r", 400, INCOMPLETE, id="eof-after-cr"),
    pytest.param(req(b"Content-Length: 10\r\n", body=b"abc"), 400, INCOMPLETE, id="eof-in-cl-body"),
    pytest.param(chunked(b"5\r\nab"), 400, INCOMPLETE, id="eof-in-chunk"),
    pytest.param(chunked(b"5\r\nhello\r\n"), 400, INCOMPLETE, id="eof-before-last-chunk"),
    pytest.param(chunked(b"5\r\nhello\r\n0\r\nX: y\r\n"), 400, INCOMPLETE, id="eof-in-trailer"),
]


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("raw,status,code", INVALID)
def test_invalid_request(raw, status, code, how):
    with pytest.raises(ProtocolError) as info:
        feed_request(raw, how)
    assert info.value.status == status
    assert info.value.close
    # An incomplete message with a second request appended is a different (still broken)
    # message: only the status is fixed then.
    if not (how == "pipelined" and code == INCOMPLETE):
        assert info.value.code == code, info.value.message


def test_remembered_name_still_needs_its_colon():
    """A field name checked once is remembered; a later line holding only that name (no colon)
    is still refused."""
    assert parse_one(req(b"Content-Type: text/plain\r\n")).get("content-type") == "text/plain"
    with pytest.raises(ProtocolError) as info:
        feed_request(req(b"Content-Type\r\n"), "whole")
    assert info.value.code == BAD and "colon" in info.value.message


def test_name_and_host_memos_are_bounded(monkeypatch):
    """Past their bound the memos stop growing; names and hosts are still checked, and
    still parsed, one by one."""
    monkeypatch.setattr(grammar, "_NAMES", {})
    monkeypatch.setattr(request, "_GOOD_HOSTS", set())
    for i in range(grammar._NAMES_MAX + 50):
        r = parse_one(b"GET / HTTP/1.1\r\nHost: h%d\r\nX-N%d: v\r\n\r\n" % (i, i))
        assert r.get("x-n%d" % i) == "v" and r.host == "h%d" % i
    assert len(grammar._NAMES) == grammar._NAMES_MAX
    assert len(request._GOOD_HOSTS) == request._GOOD_HOSTS_MAX
    for bad in (b"X(Y): v\r\n", b"X-New\r\n", b"X-New : v\r\n"):
        with pytest.raises(ProtocolError):
            feed_request(req(bad), "whole")
    with pytest.raises(ProtocolError):
        feed_request(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "whole")


def test_name_and_host_memos_keep_no_long_values(monkeypatch):
    """A long (valid) name or Host is checked and parsed but not remembered, so clients cannot
    fill the memos with kilobytes per entry."""
    monkeypatch.setattr(grammar, "_NAMES", {})
    monkeypatch.setattr(request, "_GOOD_HOSTS", set())
    name, host = "X" * 5000, "h" * 3000
    r = parse_one(b"GET / HTTP/1.1\r\nHost: %s\r\n%s: v\r\n\r\n" % (host.encode(), name.encode()),
                  max_header_bytes=16384)
    assert r.get(name.lower()) == "v" and r.host == host
    assert name not in grammar._NAMES and host not in request._GOOD_HOSTS
    assert "Host" in grammar._NAMES


def test_field_values_keep_inner_whitespace_and_obs_text():
    r = parse_one(req(b"X-A:\t a \t b\xe9 \t\r\nX-B:\r\nX-C:   \r\n"))
    assert r.get("x-a") == "a \t b\xe9" and r.get("x-b") == "" and r.get("x-c") == ""


LIMITS = dict(max_target_length=64, max_header_bytes=256, max_headers=4)
LIMIT_CASES = [
    pytest.param(b"GET /" + b"a" * 64 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, "uri_too_long",
                 id="target"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X: " + b"v" * 240 + b"\r\n\r\n", 431, TOO_LARGE,
                 id="head-bytes"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", 431,
                 TOO_LARGE, id="header-count"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X: " + b"v" * 300, 431, TOO_LARGE,
                 id="head-bytes-unterminated"),
]


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("raw,status,code", LIMIT_CASES)
def test_limits(raw, status, code, how):
    with pytest.raises(ProtocolError) as info:
        feed_request(raw, how, **LIMITS)
    assert (info.value.status, info.value.code) == (status, code)


@pytest.mark.parametrize("how", FEEDS)
def test_limits_exactly_at_the_edge_pass(how):
    raw = b"GET /" + b"a" * 63 + b" HTTP/1.1\r\n" + H + b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n"
    assert len(raw) <= LIMITS["max_header_bytes"]
    expected = [("req", "GET", "/" + "a" * 63), ("end",)]
    if how == "pipelined":
        expected += SECOND_EVENTS
    assert summary(feed_request(raw, how, **LIMITS)) == expected


def test_head_at_exact_byte_limit():
    head = b"GET / HTTP/1.1\r\n" + H + b"X: "
    head += b"v" * (256 - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == 256
    assert summary(feed_request(head, "bytewise", **LIMITS))[0] == ("req", "GET", "/")
    with pytest.raises(ProtocolError) as info:
        feed_request(head[:-4] + b"v\r\n\r\n", "bytewise", **LIMITS)
    assert info.value.status == 431


# --- limits are enforced before the data is buffered --------------------------------------
def test_long_target_refused_before_request_line_ends():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"GET /")
    assert parser.next_event() is NEED_DATA
    with pytest.raises(ProtocolError) as info:
        for _ in range(100):   # 100 x 1 KiB, no CRLF ever
            parser.feed(b"a" * 1024)
            assert parser.next_event() is NEED_DATA
    assert info.value.status == 414
    assert len(parser._buf) < http11.MAX_TARGET_LENGTH + 2048


def test_endless_head_refused_at_limit():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"GET / HTTP/1.1\r\n" + H)
    with pytest.raises(ProtocolError) as info:
        for i in range(1000):
            parser.feed(b"X-%d: %s\r\n" % (i, b"v" * 1000))
            assert parser.next_event() is NEED_DATA
    assert info.value.status == 431
    assert len(parser._buf) < http11.MAX_HEADER_BYTES + 2048


def test_content_length_over_limit_refused_before_body():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1001\r\n\r\n")
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert (info.value.status, info.value.code) == (413, "body_too_large")


def test_chunk_over_limit_refused_before_its_data():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    assert isinstance(parser.next_event(), Request)
    parser.feed(b"3e8\r\n")                         # 1000: exactly the limit
    assert parser.next_event() is NEED_DATA
    parser.feed(b"x" * 1000 + b"\r\n1\r\n")        # one more byte declared
    assert isinstance(parser.next_event(), Data)
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.status == 413


def test_error_is_sticky():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"GET / HTTP/9.9\r\n\r\n")
    with pytest.raises(ProtocolError):
        parser.next_event()
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.status == 505


# --- request attributes -------------------------------------------------------------------
def test_get_request_attributes():
    r = parse_one(b"GET /v1/models?x=1 HTTP/1.1\r\nHost: Example.com:8000\r\n"
                  b"User-Agent:  curl/8 \t\r\nX-Multi: a\r\nx-multi: b\r\n\r\n")
    assert (r.method, r.target, r.path, r.query) == ("GET", "/v1/models?x=1", "/v1/models", "x=1")
    assert r.version == (1, 1)
    assert r.headers == [("host", "Example.com:8000"), ("user-agent", "curl/8"),
                         ("x-multi", "a"), ("x-multi", "b")]
    assert r.host == "Example.com:8000"
    assert r.get("user-agent") == "curl/8"
    assert r.get("missing") is None
    assert r.get_all("x-multi") == ["a", "b"]
    assert r.keep_alive and not r.chunked and not r.expect_continue
    assert r.content_length is None
    assert r.connection_tokens == frozenset()


def test_obs_text_value_is_latin1_decoded():
    r = parse_one(b"GET / HTTP/1.1\r\n" + H + b"X: caf\xe9 \xff\r\n\r\n")
    assert r.get("x") == "caf\xe9 \xff"


@pytest.mark.parametrize("raw,keep_alive,tokens", [
    (b"GET / HTTP/1.1\r\n" + H + b"\r\n", True, set()),
    (b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n", False, {"close"}),
    (b"GET / HTTP/1.1\r\n" + H + b"Connection: Keep-Alive, CLOSE\r\n\r\n", False,
     {"keep-alive", "close"}),
    (b"GET / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nConnection: x-foo\r\n\r\n", True,
     {"upgrade", "x-foo"}),
    (b"GET / HTTP/1.0\r\n\r\n", False, set()),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True, {"keep-alive"}),
    (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True, {"keep-alive"}),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", False, {"keep-alive", "close"}),
])
def test_keep_alive(raw, keep_alive, tokens):
    r = parse_one(raw)
    assert r.keep_alive is keep_alive
    assert r.connection_tokens == tokens


@pytest.mark.parametrize("raw,expect", [
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\nhi", True),
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-Continue\r\nContent-Length: 2\r\n\r\nhi", True),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\nhi", False),
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: something\r\nContent-Length: 2\r\n\r\nhi", False),
    (b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi", False),
    # Expect = #expectation (RFC 9110 10.1.1): 100-continue among other members, empty ones
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: foo=1, 100-continue\r\nContent-Length: 2\r\n\r\nhi",
     True),
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: ,100-CONTINUE ,\r\nContent-Length: 2\r\n\r\nhi",
     True),
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue-x\r\nContent-Length: 2\r\n\r\nhi",
     False),
])
def test_expect_continue(raw, expect):
    assert parse_one(raw).expect_continue is expect


@pytest.mark.parametrize("target,path,query", [
    ("http://a/v1/models?x=1", "/v1/models", "x=1"),
    ("HTTP://A:8000", "/", ""),
    ("https://a?q", "/", "q"),
    ("http://[::1]:80//x/?a?b", "//x/", "a?b"),
    ("http://h%41st/p", "/p", ""),
])
def test_absolute_form_path_and_query(target, path, query):
    r = parse_one(b"GET %s HTTP/1.1\r\n%s\r\n" % (target.encode(), H))
    assert (r.target, r.path, r.query) == (target, path, query)


def test_higher_http1_minor_version_is_read_as_http11():
    r = parse_one(b"GET / HTTP/1.9\r\n" + H + b"\r\n")
    assert r.version == (1, 1) and r.keep_alive


def test_connection_options_are_split_on_ows_only():
    """A token followed by a non-ASCII space (obs-text, latin-1 \\xa0) is not that token."""
    r = parse_one(b"GET / HTTP/1.0\r\nConnection: keep-alive\xa0\r\n\r\n")
    assert not r.keep_alive
    r = parse_one(b"GET / HTTP/1.1\r\n" + H + b"Connection: close\xa0\r\n\r\n")
    assert r.keep_alive


def test_expect_continue_request_is_returned_before_body_arrives():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    r = parser.next_event()
    assert r.expect_continue and r.content_length == 3
    assert parser.next_event() is NEED_DATA and parser.in_body
    parser.feed(b"abc")
    assert parser.next_event().data == b"abc"
    assert parser.next_event() is END_OF_MESSAGE


def test_head_request_has_no_body():
    r = parse_one(b"HEAD / HTTP/1.1\r\n" + H + b"\r\n")
    assert r.method == "HEAD" and r.content_length is None and not r.chunked


def test_chunked_flags_and_trailers_discarded():
    events = feed_request(chunked(b"2;x=\"y\"\r\nab\r\n0\r\nTrailer-A: 1\r\n\r\n"), "whole")
    assert events[0].chunked and events[0].content_length is None
    assert summary(events[1:]) == [("data", b"ab"), ("end",)]


def test_content_length_body_arrives_in_pieces():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nab")
    r = parser.next_event()
    assert r.content_length == 10
    assert parser.next_event().data == b"ab"    # delivered now, not when the body is complete
    assert parser.next_event() is NEED_DATA
    parser.feed(b"cdef")
    assert parser.next_event().data == b"cdef"
    assert parser.next_event() is NEED_DATA
    parser.feed(b"ghijGET")                      # the rest of the body + the next request's start
    assert parser.next_event().data == b"ghij"
    assert parser.next_event() is END_OF_MESSAGE
    assert not parser.in_body and parser.has_buffered
    assert parser.next_event() is NEED_DATA
    parser.feed(b" /n HTTP/1.1\r\n" + H + b"\r\n")
    assert parser.next_event().target == "/n"


def test_three_pipelined_requests_in_one_feed():
    raw = (b"GET /1 HTTP/1.1\r\n" + H + b"\r\n"
           b"POST /2 HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
           b"POST /3 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n")
    parser = RequestParser(MAX_BODY)
    parser.feed(raw)
    events = []
    drain(parser, events)
    assert summary(events) == [("req", "GET", "/1"), ("end",), ("req", "POST", "/2"),
                               ("data", b"abc"), ("end",), ("req", "POST", "/3"),
                               ("data", b"z"), ("end",)]
    assert not parser.has_buffered


def test_has_buffered_and_in_body():
    parser = RequestParser(MAX_BODY)
    assert not parser.has_buffered and not parser.in_body
    parser.feed(b"GET / HTTP/1.1\r\n" + H + b"\r\nGE")
    assert parser.has_buffered
    assert isinstance(parser.next_event(), Request)
    assert parser.in_body                        # until its END_OF_MESSAGE
    assert parser.next_event() is END_OF_MESSAGE
    assert not parser.in_body and parser.has_buffered
    assert parser.next_event() is NEED_DATA


def test_clean_eof_between_requests():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() is END_OF_MESSAGE
    assert not parser.eof
    parser.feed_eof()
    assert parser.eof
    for _ in range(3):
        assert parser.next_event() is NEED_DATA


def test_eof_with_complete_pipelined_requests_still_parses_them():
    parser = RequestParser(MAX_BODY)
    parser.feed(b"GET /a HTTP/1.1\r\n" + H + b"\r\nGET /b HTTP/1.1\r\n" + H + b"\r\n")
    parser.feed_eof()
    events = []
    drain(parser, events)
    assert summary(events) == [("req", "GET", "/a"), ("end",), ("req", "GET", "/b"), ("end",)]


def test_large_body_streams_in_slices_quickly():
    body = bytes(range(256)) * 4096                     # 1 MiB
    parser = RequestParser(len(body))
    parser.feed(b"POST /big HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(body))
    assert isinstance(parser.next_event(), Request)
    pieces = []
    start = time.perf_counter()
    step = 64 * 1024
    for i in range(0, len(body), step):
        parser.feed(body[i:i + step])
        ev = parser.next_event()
        pieces.append(ev.data)
        assert parser.next_event() in (NEED_DATA, END_OF_MESSAGE)
    elapsed = time.perf_counter() - start
    assert len(pieces) == 16 and all(len(p) == step for p in pieces)   # one slice per feed
    assert b"".join(pieces) == body
    assert elapsed < 0.5


def test_large_chunked_body_streams_in_slices():
    body = b"x" * (1 << 20)
    parser = RequestParser(len(body))
    raw = (b"POST /big HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
           + chunk(body) + LAST_CHUNK)
    events = run(parser, [raw[i:i + 65536] for i in range(0, len(raw), 65536)])
    data = [e for e in events if isinstance(e, Data)]
    assert len(data) <= 17 and b"".join(d.data for d in data) == body


def test_byte_at_a_time_large_head_is_not_quadratic():
    head = b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 500)
                                                 for i in range(90)) + b"\r\n"
    assert len(head) < http11.MAX_HEADER_BYTES
    start = time.perf_counter()
    events = run(RequestParser(MAX_BODY), bytewise(head))
    assert len(events[0].headers) == 91
    assert time.perf_counter() - start < 1.5


# --- response parser ----------------------------------------------------------------------
def feed_response(raw, how, method="POST"):
    parser = ResponseParser(method)
    pieces = bytewise(raw) if how == "bytewise" else [raw]
    return parser, run(parser, pieces)


SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
       b"\r\n" + chunk(b"data: {\"a\":1}\n\n") + chunk(b": ping\n\n") + chunk(b"data: [DONE]\n\n")
       + LAST_CHUNK)

RESPONSES = [
    pytest.param(SSE, "POST",
                 [("resp", 200), ("data", b"data: {\"a\":1}\n\n: ping\n\ndata: [DONE]\n\n"),
                  ("end",)], True, id="chunked-sse"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "GET",
                 [("resp", 200), ("data", b"{}"), ("end",)], True, id="content-length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", "GET",
                 [("resp", 200), ("data", b"until the end"), ("end",)], False, id="until-eof"),
    pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE", [("resp", 204), ("end",)], True,
                 id="204"),
    pytest.param(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET",
                 [("resp", 304), ("end",)], True, id="304-ignores-cl"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "HEAD",
                 [("resp", 200), ("end",)], True, id="head-ignores-cl"),
    pytest.param(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                 b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx", "POST",
                 [("resp", 201), ("data", b"x"), ("end",)], True, id="interim-skipped"),
    pytest.param(b"HTTP/1.1 503 \r\nContent-Length: 0\r\n\r\n", "GET",
                 [("resp", 503), ("end",)], True, id="empty-reason"),
    pytest.param(b"HTTP/1.1 503\r\nContent-Length: 0\r\n\r\n", "GET",
                 [("resp", 503), ("end",)], True, id="no-reason"),
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", "GET",
                 [("resp", 200), ("data", b"x"), ("end",)], False, id="http10-close"),
    pytest.param(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
                 "GET", [("resp", 200), ("data", b"x"), ("end",)], True, id="http10-keep-alive"),
    pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", "GET",
                 [("resp", 200), ("data", b"x"), ("end",)], False, id="connection-close"),
]


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("raw,method,expected,keep_alive", RESPONSES)
def test_valid_response(raw, method, expected, keep_alive, how):
    parser, events = feed_response(raw, how, method)
    assert summary(events) == expected
    assert events[0].keep_alive is keep_alive
    assert parser.done and not parser.has_buffered


def test_response_attributes():
    parser, events = feed_response(SSE, "whole")
    r = events[0]
    assert (r.status, r.reason, r.version) == (200, "OK", (1, 1))
    assert r.chunked and r.has_body and r.content_length is None
    assert r.get("content-type") == "text/event-stream"
    assert r.get_all("transfer-encoding") == ["chunked"]


def test_response_body_pieces_are_delivered_as_they_arrive():
    parser = ResponseParser("POST")
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert isinstance(parser.next_event(), Response)
    assert parser.next_event() is NEED_DATA
    parser.feed(chunk(b"data: 1\n\n"))
    assert parser.next_event().data == b"data: 1\n\n"
    assert parser.next_event() is NEED_DATA
    parser.feed(LAST_CHUNK)
    assert parser.next_event() is END_OF_MESSAGE
    assert parser.next_event() is NEED_DATA


def test_response_extra_bytes_after_message_are_reported():
    parser = ResponseParser("GET")
    parser.feed(b"HTTP/1.1 204 No Content\r\n\r\njunk")
    assert parser.next_event().status == 204
    assert parser.next_event() is END_OF_MESSAGE
    assert parser.next_event() is NEED_DATA
    assert parser.has_buffered           # the caller must not reuse this connection


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("raw,code", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
     "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/2 200 OK\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 099 X\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1  200 OK\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nX: y\r\n z\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 200 O\x00K\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n", "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
     "bad_upstream_response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "upstream_incomplete"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "upstream_incomplete"),
    (b"HTTP/1.1 200 OK\r\n", "upstream_incomplete"),
    (b"", "upstream_closed"),
])
def test_invalid_response(raw, code, how):
    with pytest.raises(ProtocolError) as info:
        feed_response(raw, how)
    assert (info.value.status, info.value.code) == (502, code)


def test_response_head_size_limit():
    parser = ResponseParser("GET", max_header_bytes=128)
    parser.feed(b"HTTP/1.1 200 OK\r\nX: " + b"v" * 200)
    with pytest.raises(ProtocolError):
        parser.next_event()


def test_too_many_interim_responses():
    parser = ResponseParser("GET")
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n" * (http11.MAX_INTERIM_RESPONSES + 1))
    with pytest.raises(ProtocolError):
        parser.next_event()


# --- serializers --------------------------------------------------------------------------
def test_response_head():
    assert response_head(200, [("content-type", "application/json"), ("content-length", "2")]) \
        == b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
    assert response_head(429, []) == b"HTTP/1.1 429 Too Many Requests\r\n\r\n"
    assert response_head(599, []) == b"HTTP/1.1 599 Unknown\r\n\r\n"
    assert response_head(200, [], version=b"HTTP/1.0") == b"HTTP/1.0 200 OK\r\n\r\n"
    assert response_head(200, [("x", "caf\xe9")]) == b"HTTP/1.1 200 OK\r\nx: caf\xe9\r\n\r\n"


def test_request_head():
    assert request_head("POST", "/v1/chat/completions", [("host", "127.0.0.1:8080")]) == (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n\r\n")


BAD_FIELDS = [("x", "a\r\nSet-Cookie: evil"), ("x", "a\rb"), ("x", "a\nb"), ("x", "a\x00b"),
              ("x\r\ny", "v"), ("x\n", "v"), ("x\x00", "v"), ("x y", "v"), ("x:y", "v"), ("", "v"),
              ("x", "\u0100")]


@pytest.mark.parametrize("field", BAD_FIELDS)
def test_serializers_refuse_splitting(field):
    with pytest.raises(ValueError):
        response_head(200, [("a", "b"), field])
    with pytest.raises(ValueError):
        request_head("GET", "/", [field])


@pytest.mark.parametrize("method,target", [("GET", "/a b"), ("GET", "/a\r\nX: y"), ("G T", "/"),
                                           ("GET", "")])
def test_request_head_refuses_bad_line(method, target):
    with pytest.raises(ValueError):
        request_head(method, target, [])


def test_response_head_refuses_bad_status():
    with pytest.raises(ValueError):
        response_head(1000, [])
    with pytest.raises(ValueError):
        response_head(200, [], version=b"HTTP/1.1\r\nX: y")


def test_chunk_and_constants():
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert chunk(memoryview(b"abc")) == b"3\r\nabc\r\n"
    assert chunk(b"") == b""
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert CONTINUE_100 == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_request_round_trip():
    raw = request_head("POST", "/v1/completions?s=1",
                       [("host", "127.0.0.1"), ("transfer-encoding", "chunked")])
    raw += chunk(b'{"prompt":') + chunk(b'"hi"}') + LAST_CHUNK
    events = feed_request(raw, "bytewise")
    assert summary(events) == [("req", "POST", "/v1/completions?s=1"),
                               ("data", b'{"prompt":"hi"}'), ("end",)]


def test_response_round_trip():
    raw = response_head(200, [("transfer-encoding", "chunked")]) + chunk(b"ab") + LAST_CHUNK
    _, events = feed_response(raw, "bytewise")
    assert summary(events) == [("resp", 200), ("data", b"ab"), ("end",)]


# ---- take_whole_body: a buffered Content-Length body and its end in one call ------------------
def test_take_whole_body_returns_the_body_and_ends_the_message():
    p = RequestParser(1 << 20)
    p.feed(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n"
           b"Host: x\r\n\r\n")
    assert isinstance(p.next_event(), http11.Request)
    assert p.take_whole_body() == b"hello"
    nxt = p.next_event()                      # the pipelined request is next, untouched
    assert isinstance(nxt, http11.Request) and nxt.path == "/b"
    assert p.take_whole_body() is None        # no body: END_OF_MESSAGE via next_event
    assert p.next_event() is http11.END_OF_MESSAGE


def test_take_whole_body_waits_for_a_partial_body_and_ignores_chunked():
    p = RequestParser(1 << 20)
    p.feed(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel")
    p.next_event()
    assert p.take_whole_body() is None
    assert p.next_event().data == b"hel"      # the event path goes on as before
    p.feed(b"lo")
    assert p.take_whole_body() == b"lo"
    q = RequestParser(1 << 20)
    q.feed(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    q.next_event()
    assert q.take_whole_body() is None


def test_take_whole_body_of_a_response_then_nothing_more():
    p = ResponseParser("POST")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(p.next_event(), http11.Response)
    assert p.take_whole_body() == b""
    assert p.done and p.next_event() is NEED_DATA and not p.has_buffered


# --- parsed heads reused (memo) -----------------------------------------------------------
def test_identical_request_heads_on_a_connection_reuse_one_parse():
    """A keep-alive client repeating its head gets the same (immutable) Request back, with the
    framing of each request right; a head that differs at all is parsed afresh."""
    one = req(b"Content-Length: 5\r\n", body=b"hello")
    other = req(b"Content-Length: 3\r\n", body=b"abc")
    parser = RequestParser(MAX_BODY)
    events = run(parser, [one, one + one, other, one])
    assert summary(events) == [("req", "POST", "/"), ("data", b"hello"), ("end",)] * 3 + [
        ("req", "POST", "/"), ("data", b"abc"), ("end",),
        ("req", "POST", "/"), ("data", b"hello"), ("end",)]
    heads = [ev for ev in events if isinstance(ev, Request)]
    assert heads[0] is heads[1] is heads[2]
    assert heads[3] is not heads[0] and heads[3].content_length == 3
    assert heads[4] is not heads[0] and heads[4].content_length == 5   # only the last is kept
    # Another connection never gets this connection's object.
    assert parse_one(one) is not heads[4]


@pytest.mark.parametrize("variant", [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\nX: y\r\n\r\nhello",          # bare LF
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n x\r\n\r\nhello",          # obs-fold
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/2.0\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
])
def test_request_head_memo_never_skips_a_check(variant):
    """After a good head is remembered, a near-identical bad one is still refused."""
    good = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    parser = RequestParser(MAX_BODY)
    assert summary(run(parser, [good], eof=False))[0] == ("req", "POST", "/")
    parser.feed(variant)
    with pytest.raises(ProtocolError) as info:
        drain(parser, [])
    assert info.value.status in (400, 505)


def test_long_request_heads_are_not_remembered():
    filler = b"X-Pad: " + b"p" * http11.HEAD_MEMO_MAX_CHARS + b"\r\n"
    long_head = req(filler + b"Content-Length: 1\r\n", body=b"z")
    parser = RequestParser(MAX_BODY, max_header_bytes=4 * http11.HEAD_MEMO_MAX_CHARS)
    heads = [ev for ev in run(parser, [long_head, long_head]) if isinstance(ev, Request)]
    assert len(heads) == 2 and heads[0] is not heads[1]
    assert heads[1].get("x-pad") == "p" * http11.HEAD_MEMO_MAX_CHARS


def test_response_head_memo_keys_on_method_and_head(monkeypatch):
    """llama-server's heads are shared across connections, per request method: the same head
    answering HEAD has no body. Distinct heads keep their own framing."""
    monkeypatch.setattr(response, "_RESPONSE_MEMO", {})
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    _, a = feed_response(raw + b"{}", "whole", "POST")
    _, b = feed_response(raw + b"{}", "whole", "POST")
    _, h = feed_response(raw, "whole", "HEAD")
    assert a[0] is b[0] and a[0].has_body and summary(a)[1:] == [("data", b"{}"), ("end",)]
    assert h[0] is not a[0] and not h[0].has_body and summary(h)[1:] == [("end",)]
    _, c = feed_response(raw.replace(b": 2", b": 3") + b"abc", "whole", "POST")
    assert c[0].content_length == 3 and summary(c)[1:] == [("data", b"abc"), ("end",)]
    bad = raw.replace(b"Content-Type", b"Content-Type\n")    # near-identical, bare LF
    with pytest.raises(ProtocolError):
        feed_response(bad + b"{}", "whole", "POST")


def test_response_head_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(response, "_RESPONSE_MEMO", {})
    for i in range(response._RESPONSE_MEMO_MAX * 3):
        body = b"x" * i
        _, events = feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                                  % (i, body), "whole")
        assert events[0].content_length == i and b"".join(
            e.data for e in events if isinstance(e, Data)) == body
        assert len(response._RESPONSE_MEMO) <= response._RESPONSE_MEMO_MAX
    # Interim 1xx heads are never remembered (they parse to "skip").
    _, events = feed_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                              "whole")
    assert events[0].status == 204
    assert all(r is not None for r in response._RESPONSE_MEMO.values())


# ---- take_chunks: whole canonical chunks, as received, in one call ---------------------------
def _chunked_response(extra: bytes = b"") -> ResponseParser:
    p = ResponseParser("POST")
    p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + extra)
    assert isinstance(p.next_event(), http11.Response)
    return p


def test_take_chunks_returns_whole_canonical_chunks_as_received():
    pieces = [b"a" * 1, b"b" * 15, b"c" * 16, b"d" * 300]
    framed = b"".join(chunk(x) for x in pieces)
    p = _chunked_response(framed + b"2\r\nxy")         # and a partial chunk after them
    got, spans, size = p.take_chunks()
    assert got == framed and size == sum(map(len, pieces))
    assert [got[spans[i]:spans[i + 1]] for i in range(0, len(spans), 2)] == pieces
    assert p.take_chunks() is None                     # the partial chunk is next_event's
    assert p.next_event().data == b"xy"
    assert p.take_chunks() is None                     # its CRLF is still due
    p.feed(b"\r\n" + chunk(b"z") + LAST_CHUNK)
    assert p.take_chunks()[0] == chunk(b"z")           # the CRLF consumed, then whole chunks
    assert p.take_chunks() is None                     # the last chunk is never taken
    assert p.next_event() is http11.END_OF_MESSAGE


@pytest.mark.parametrize("odd", [b"A\r\n0123456789\r\n",          # uppercase hex
                                 b"0a\r\n0123456789\r\n",         # leading zero
                                 b"a;x=1\r\n0123456789\r\n",      # an extension
                                 b"a ; x\r\n0123456789\r\n"])     # an extension, spaced
def test_take_chunks_stops_at_a_chunk_framed_otherwise_and_next_event_takes_it(odd):
    p = _chunked_response(chunk(b"first") + odd + chunk(b"last") + LAST_CHUNK)
    got, _spans, size = p.take_chunks()
    assert got == chunk(b"first") and size == 5
    assert p.take_chunks() is None
    assert p.next_event().data == b"0123456789"        # the odd one, the usual way
    assert p.take_chunks()[0] == chunk(b"last")        # then whole chunks again
    assert p.next_event() is http11.END_OF_MESSAGE


@pytest.mark.parametrize("bad", [b"5\r\nhelloXY", b"5\r\nhello\n", b"zz\r\n"])
def test_take_chunks_leaves_a_broken_chunk_to_next_event_which_raises(bad):
    p = _chunked_response(chunk(b"ok") + bad + b"\r\n" * 3)
    assert p.take_chunks()[0] == chunk(b"ok")
    assert p.take_chunks() is None
    with pytest.raises(ProtocolError):
        while True:
            if p.next_event() is NEED_DATA:
                break
    assert p.take_chunks() is None                     # an errored parser gives nothing


def test_take_chunks_keeps_the_body_limit():
    p = RequestParser(10)
    p.feed(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunk(b"12345") + chunk(b"678910"))
    p.next_event()
    assert p.take_chunks()[2] == 5                     # the second chunk would pass 10 bytes
    assert p.take_chunks() is None
    with pytest.raises(ProtocolError) as exc:
        p.next_event()
    assert exc.value.status == 413


def test_take_chunks_is_none_outside_a_chunked_body():
    p = ResponseParser("POST")
    assert p.take_chunks() is None                     # before the head
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n5\r\nhello")
    p.next_event()
    assert p.take_chunks() is None                     # a Content-Length body


# ---- feed_chunks: feed() then take_chunks(), without the copy ---------------------------------
def _drain(p: ResponseParser, out: list) -> None:
    """What the relay does after a read: whole chunks, then events until more bytes are needed."""
    while True:
        got = p.take_chunks()
        if got is not None:
            out.append(("chunks", bytes(got[0]), got[1], got[2]))
        try:
            event = p.next_event()
        except ProtocolError as exc:
            out.append(("error", exc.status, str(exc)))
            return
        if event is NEED_DATA:
            return
        out.append(("event", event.data if isinstance(event, Data) else event))
        if event is http11.END_OF_MESSAGE:
            return


@pytest.mark.parametrize("seed", range(8))
def test_feed_chunks_gives_what_feed_then_take_chunks_gives(seed):
    rng = random.Random(seed)
    pieces = [chunk(bytes([97 + i % 26]) * rng.choice([1, 2, 15, 16, 17, 200]))
              for i in range(rng.randint(1, 12))]
    odd = [b"A\r\n0123456789\r\n", b"a;x=1\r\n0123456789\r\n", b"5\r\nhelloXY", b"zz\r\n"]
    for _ in range(rng.randint(0, 2)):
        pieces.insert(rng.randrange(len(pieces) + 1), rng.choice(odd))
    body = b"".join(pieces) + LAST_CHUNK
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 8))))
    reads = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    limit = rng.choice([10 ** 6, len(body) // 2])
    old, new = _chunked_response(), _chunked_response()
    old._max_body = new._max_body = limit
    want, got = [], []
    for data in reads:
        old.feed(data)
        _drain(old, want)
        taken = new.feed_chunks(data)
        if taken is not None:
            got.append(("chunks", bytes(taken[0]), taken[1], taken[2]))
        _drain(new, got)
        assert got == want
        if want and want[-1][0] == "error":
            break
    assert old.has_buffered == new.has_buffered


def test_feed_chunks_takes_a_read_of_whole_chunks_as_it_is_and_buffers_only_the_rest():
    p = _chunked_response()
    read = chunk(b"event one") + chunk(b"event two")
    framed, spans, size = p.feed_chunks(read)
    assert framed is read and size == 18 and not p.has_buffered      # no copy at all
    framed, _spans, size = p.feed_chunks(chunk(b"three") + b"4\r\nfo")
    assert framed == chunk(b"three") and size == 5
    assert p.feed_chunks(b"ur\r\n") == (chunk(b"four"), [3, 7], 4)   # buffered: the usual way
    assert p.feed_chunks(LAST_CHUNK) is None
    assert p.next_event() is http11.END_OF_MESSAGE
    with pytest.raises(RuntimeError):                   # as feed(): nothing after the EOF
        p.feed_eof()
        p.feed_chunks(b"x")
