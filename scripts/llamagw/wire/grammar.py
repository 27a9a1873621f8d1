"""HTTP/1.1 limits and grammar shared by the parsers and serializers (sans-IO).

The numbers every parser and writer is bounded by (each with where it comes from), the RFC 9110 /
9112 token, field and chunk grammars as compiled regexes, and the field-section helpers both
parsers use: _parse_fields (CRLF-separated lines -> [(lower-case name, value)], names checked
once and memoized in a bounded table), Connection tokens and Transfer-Encoding validation.
Errors are errors.ProtocolError built by the `err` callable the caller passes (400 for a request,
502 for an upstream response), so one grammar serves both sides. Public names are re-exported by
wire/http11.py. The only state is the bounded memo of field names already checked.
"""

from __future__ import annotations

import re

from llamagw.errors import ProtocolError

# --- limits: where each number comes from ---------------------------------------------------
# Request-target length; 8 KiB is the common server default (nginx/Apache request-line limits).
MAX_TARGET_LENGTH = 8192
# Whole head, request line and terminator included; 4x nginx's large_client_header_buffers
# (4 x 8k), so real clients with big cookies/tokens fit while a slow flood stays bounded.
MAX_HEADER_BYTES = 65536
# Header fields per head; CPython http.client._MAXHEADERS.
MAX_HEADERS = 100
# Chunk-size line (16 hex digits + extensions); real clients send no extensions at all, this only
# bounds how much an extension flood makes us buffer.
MAX_CHUNK_LINE = 4096
# Trailer section after the last chunk; trailers are rare and discarded, so keep them small.
MAX_TRAILER_BYTES = 16384
# Empty lines tolerated before a request line (RFC 9112 2.2 asks for "at least one").
MAX_LEADING_EMPTY_LINES = 4
# Content-Length digits (leading zeros not counted); 10**18 - 1 fits a signed 64-bit integer, far
# beyond any body limit: a longer value is a valid number too large to allow (413).
MAX_CONTENT_LENGTH_DIGITS = 18
# Chunk-size hex digits (leading zeros not counted); 16 hex digits are 64 bits.
MAX_CHUNK_SIZE_DIGITS = 16
# Longest method token looked at before its space arrives; the longest IANA-registered method
# (UPDATEREDIRECTREF) has 17 characters.
MAX_METHOD_LENGTH = 32
# 1xx interim responses skipped before the final one (llama-server sends at most 100 Continue).
MAX_INTERIM_RESPONSES = 16

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# --- grammar (RFC 9110 5.6.2 token, 5.5 field-value; RFC 9112 3.2 Host, 7.1 chunks) -----------
_TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = f"[{_TCHAR}]+"
_VCHAR_OBS = r"\x21-\x7e\x80-\xff"
# name ":" OWS value OWS; value = field-vchars separated by SP/HTAB runs (linear, no ReDoS).
_FIELD = rf"({_TOKEN}):[ \t]*((?:[{_VCHAR_OBS}]+(?:[ \t]+[{_VCHAR_OBS}]+)*)?)[ \t]*"
_FIELD_RE = re.compile(_FIELD)
# Control characters a field line may not hold (HTAB may; CR and LF only as the line ends,
# which _take_block checked).
_CTL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Field names already checked as tokens -> their lower-case form; real traffic uses a few dozen,
# and once full, new names are still checked, just not remembered. Only short names are kept, so
# the memo stays small whatever clients send (a name may be as long as a whole head).
_NAMES: dict[str, str] = {}
_NAMES_MAX = 1024
_NAME_MEMO_LEN = 64
# Parsed heads, reused for a byte-identical head. Parsing is a pure function of the head's text
# and the parser's limits, and Request/Response objects are never mutated, so a head seen before
# gives the same object. A keep-alive client sends the same head again and again (same key, route
# and body length), and llama-server answers with few distinct heads: ~5 us saved per head, ~10 %
# of the gateway's CPU per small request (bench case a). A request head is remembered per client
# connection (the last one only: one client's heads never meet another's); response heads come
# from llama-server (trusted, 127.0.0.1) and are shared, up to _RESPONSE_MEMO_MAX (in
# wire/response.py), then the memo starts over. Heads longer than HEAD_MEMO_MAX_CHARS are not
# kept (memory per idle connection).
HEAD_MEMO_MAX_CHARS = 2048
_TOKEN_RE = re.compile(_TOKEN)
# The characters of a request-target (RFC 3986 via RFC 9112 3.2): unreserved, sub-delims, ":",
# "@", "/", "?" and "%" (then checked by _BAD_PCT_RE); no "#" (a fragment is never sent). "[" and
# "]" only in the host of an absolute-form target (_URI_CHARS_RE).
_TARGET_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]+")
_DIGITS_RE = re.compile(f"[0-9]{{1,{MAX_CONTENT_LENGTH_DIGITS}}}")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# One element of a Transfer-Encoding list (RFC 9112 7, RFC 9110 5.6.1), matched from where the
# previous one ended: OWS, then a transfer-coding (token, then ";" name=value parameters) or an
# empty element, OWS, then "," or the end.
_TCODING_RE = re.compile(
    rf"[ \t]*(?:({_TOKEN})((?:[ \t]*;[ \t]*{_TOKEN}[ \t]*=[ \t]*(?:{_TOKEN}|"
    + _QUOTED.decode("latin-1") + r"))*)[ \t]*)?(,|\Z)")
_CHUNK_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]+)"
    + rb"(?:[ \t]*;[ \t]*" + _TOKEN.encode()
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN.encode() + rb"|" + _QUOTED + rb"))?)*")
# A chunk-size line exactly as chunk() writes one: lowercase hex, no leading zero, no extension
# (the last chunk, "0", is not one of these). take_chunks() passes such chunks through whole.
_CANONICAL_CHUNK_RE = re.compile(rb"([1-9a-f][0-9a-f]{0,%d})\r\n" % (MAX_CHUNK_SIZE_DIGITS - 1))
_NO_TOKENS: frozenset[str] = frozenset()


# --- shared helpers -------------------------------------------------------------------------
def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, 400, "bad_request")


def _field_error(line: str, err) -> ProtocolError:
    """Say why a field line failed _FIELD_RE (slow path, only on errors)."""
    if line[:1] in (" ", "\t"):
        return err("obsolete line folding (a header line starting with whitespace)")
    colon = line.find(":")
    if colon < 0:
        return err("header line without a colon")
    if colon == 0:
        return err("empty header name")
    name = line[:colon]
    if name[-1] in " \t":
        return err("whitespace between header name and colon")
    if not _TOKEN_RE.fullmatch(name):
        return err("invalid character in header name")
    return err("invalid character in header value")


def _parse_fields(block: str, max_headers: int, err) -> list[tuple[str, str]]:
    """CRLF-separated field lines -> [(lower-case name, value)].

    The block has no bare CR/LF (_take_block checked it), so splitting at CRLF gives the lines.
    One C-level search over the block refuses the control characters a field may not hold; each
    line is then `token ":" OWS value OWS`, its name checked once and remembered (lower-cased).
    """
    if not block:
        return []
    lines = block.split("\r\n")
    if len(lines) > max_headers:
        raise ProtocolError(f"more than {max_headers} header fields", 431, "header_too_large")
    if _CTL_RE.search(block) is not None:
        raise _first_bad_field(lines, err)
    names = _NAMES
    out = []
    for line in lines:
        name, sep, value = line.partition(":")
        low = names.get(name) if sep else None
        if low is None:
            if not sep or not _TOKEN_RE.fullmatch(name):
                raise _field_error(line, err)
            low = name.lower()
            if len(names) < _NAMES_MAX and len(name) <= _NAME_MEMO_LEN:
                names[name] = low
        out.append((low, value.strip(" \t")))
    return out


def _first_bad_field(lines: list[str], err) -> ProtocolError:
    for line in lines:   # slow path: name the first bad line
        if _FIELD_RE.fullmatch(line) is None:
            return _field_error(line, err)
    return err("malformed header section")


def _connection_tokens(values: list[str]) -> frozenset[str]:
    if not values:
        return _NO_TOKENS
    # split at "," and OWS (SP / HTAB) only: str.strip() would also drop a latin-1 \xa0
    return frozenset(t for v in values for t in (p.strip(" \t").lower() for p in v.split(","))
                     if t)


def _check_transfer_encoding(values: list[str], err, unsupported) -> None:
    """Accept a Transfer-Encoding whose codings are exactly "chunked" (empty list elements and
    several field lines allowed: RFC 9110 5.6.1, 5.3). Chunked not the final coding: err (the
    length cannot be known, RFC 9112 6.3); chunked last after other codings: unsupported."""
    if len(values) == 1 and values[0].lower() == "chunked":
        return
    value = ",".join(values)
    codings: list[tuple[str, bool]] = []        # (name, has parameters)
    pos = 0
    while True:
        m = _TCODING_RE.match(value, pos)
        if m is None:
            raise err("malformed Transfer-Encoding")
        if m.group(1):
            codings.append((m.group(1).lower(), bool(m.group(2))))
        if not m.group(3):
            break
        pos = m.end()
    if not codings:
        raise err("empty Transfer-Encoding")
    names = [name for name, _ in codings]
    if names[-1] != "chunked":
        raise err("chunked is not the final transfer coding (the body length is unknown)")
    if codings[-1][1]:
        raise err("the chunked coding takes no parameters")
    if names.count("chunked") > 1:
        raise err("chunked applied more than once")
    if len(names) > 1:
        raise unsupported(f"unsupported transfer coding {', '.join(names[:-1])!r}")
