"""Refuse a JSON request body that llama-server (or the gateway itself) should not parse.

    check(body: bytes) -> dict      the parsed object, or GatewayError 400

llama-server parses request bodies recursively: a body nested 200,000 objects deep (1.2 MB)
overflows its stack and kills it (SIGSEGV), with every stream it is serving. Python's json.loads
recurses too (RecursionError near 1,000 levels) and builds a Python object per value (a 30 MB body
of `[[],[],...]` would take over a gigabyte and seconds on the event loop). So the body's shape is
measured first, without recursion and without a Python loop over its bytes, and only a body within
the limits is parsed. Refused, each a 400 (the code is the OpenAI envelope's):

- `invalid_json`: an empty body; bytes that are not UTF-8 (RFC 8259 8.1); whatever json.loads
  refuses; NaN and Infinity (Python takes them, JSON does not); a \\u escape of a lone UTF-16
  surrogate (no character; the Ollama translation could not re-encode it). llama-server answers
  each of these with its own 400 (checked with build 11434), so nothing that worked stops working.
  A UTF-8 byte order mark before the object is skipped, as llama-server skips it.
- `json_too_deep`: arrays and objects nested deeper than MAX_JSON_DEPTH.
- `json_too_many_containers`: more than MAX_JSON_CONTAINERS arrays and objects in all.
- `json_not_object`: a top level that is not an object (every API body is one).

The shape, at C speed (bytes methods, re, itertools; loops only over brackets, in bounded number):
1. a body with at most MAX_JSON_DEPTH `[` and `{` bytes is within both limits: done (a chat body);
2. escaped backslashes and escaped quotes are removed in one left-to-right pass, as JSON reads
   them (backslash and quote bytes never occur inside a multi-byte UTF-8 character); everything
   but `"[]{}` is deleted; what lies between quotes (string contents) is cut out. Left are the
   brackets outside strings: each opener is an array or object;
3. the depth: innermost `()` pairs are removed, one level a pass, while that halves what is left;
   then the highest running sum of +1 per opener, -1 per closer over the rest.
Up to the first byte that json.loads would refuse, this reads the body exactly as JSON does, so
json.loads never goes deeper or builds more containers than counted (beyond that byte the count
may be off, but the body is refused either way). A body whose brackets do not balance may be
called too deep where it is merely invalid: a 400 either way.

Cost (measured on 2 shared cores): about 2 us for a 200-byte chat body, about json.loads' own;
about 0.15 ms for 30 KB of conversation (0.07 of it json.loads); a 30 MB body of brackets is
refused in ~0.15 s.
"""

from __future__ import annotations

import itertools
import json
import re

from llamagw.errors import GatewayError

# Deepest nesting of arrays and objects accepted (the top-level object is depth 1). A chat request
# nests 4-6 deep; tools and response_format carry JSON Schemas, 2-4 levels per level of the schema
# (properties, items, anyOf), so 100 leaves room for schemas 25 levels deep. llama-server (build
# 11434, 8 MB thread stacks) still answered at 100,000 and died at 200,000; a smaller stack dies
# sooner. Python's json recurses to ~1,000.
MAX_JSON_DEPTH = 100
# Arrays and objects in one body. Each costs json.loads ~60-250 bytes and ~0.2 us (a dict or list),
# so 100,000 bound a parse to ~25 MB and ~30 ms. A chat has one per message (a few per content
# part or tool call), an embeddings batch one per input, a tool schema a few dozen: legitimate
# bodies stay far below.
MAX_JSON_CONTAINERS = 100_000
# Step 2: escaped quotes and backslashes are removed by a regex (one pass, but ~0.3 us a match);
# past this many (a body of escaped quotes) by two bytes.replace passes (~10 ns a match).
REGEX_ESCAPES_MAX = 4096
# Step 3: running sums are taken over slices of this many brackets (no more than
# 2 * MAX_JSON_CONTAINERS in all by then), so that the sum stops soon after it passes the limit.
DEPTH_SLICE = 4096

# Step 2: one pass, left to right: an escaped backslash (the quote after it stays a quote) or an
# escaped quote. Other escapes (\n, \uXXXX) hide no quote.
_QUOTE_OR_BACKSLASH_ESCAPE = re.compile(rb'\\[\\"]')
# Steps 1 and 2: delete all but quotes and brackets (and backslashes, to tell whether there are
# escapes to read).
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b'"[]{}')
_NOT_STRUCTURAL_OR_BACKSLASH = bytes(b for b in range(256) if b not in b'"[]{}\\')
# Step 3: brackets as parentheses (a mismatch like `[}` is json.loads' to refuse), then
# openers -> +1, closers -> -1 as signed bytes.
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_SIGNS = bytes.maketrans(b"()", b"\x01\xff")
# Lone surrogates: a cheap search for any surrogate escape, then every escape read in order: a
# surrogate escape with its partner (fine), one alone (refused), or any other escape (skipped
# whole, so that an escaped backslash followed by "ud800" is not taken for an escape).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_ESCAPES = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                      r"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\\.")
_LONE_SURROGATE_LEN = 6


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN_ONCE = _DECODER.scan_once
_JSON_WHITESPACE = " \t\n\r"
_BOM = "\ufeff"


def _parse(text: str):
    """json.loads(text) without NaN / Infinity: the scanner alone when the value fills the text
    (the common case; ~0.4 us less than the full decoder on a chat body)."""
    try:
        obj, end = _SCAN_ONCE(text, 0)
        if end == len(text) or not text[end:].strip(_JSON_WHITESPACE):
            return obj
    except StopIteration:          # no value at 0: leading whitespace, or an error
        pass
    return _DECODER.decode(text)   # whitespace before, or the error with its own message


def _invalid(message: str) -> GatewayError:
    return GatewayError(400, f"Invalid JSON body: {message}", "invalid_json")


def _too_deep() -> GatewayError:
    return GatewayError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels",
                        "json_too_deep")


def structure(body: bytes, kept: bytes | None = None) -> bytes:
    """The brackets of `body` outside its strings, as `(` and `)` (step 2). `kept`: the body
    with all but `"\\[]{}` deleted, when the caller has it already."""
    if kept is None:
        kept = body.translate(None, _NOT_STRUCTURAL_OR_BACKSLASH)
    if b"\\" in kept:
        s, escapes = _QUOTE_OR_BACKSLASH_ESCAPE.subn(b"", body, count=REGEX_ESCAPES_MAX)
        if escapes == REGEX_ESCAPES_MAX:
            s = body.replace(b"\\\\", b"").replace(b'\\"', b"")
        s = s.translate(None, _NOT_STRUCTURAL)
    else:
        s = kept
    # An empty string, or two strings with nothing structural between them: no bracket lost.
    s = s.replace(b'""', b"")
    if b'"' in s:
        s = b"".join(s.split(b'"')[::2])      # string contents are every other piece
    return s.translate(_PARENS)


def depth_of(parens: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of a string of `(` and `)` (step 3): exact when they balance, an upper
    bound otherwise; a value over `limit` only says "deeper than limit" (counting stops there)."""
    s = parens
    passes = 0
    while s and passes <= limit:
        # Each pass removes every innermost pair: the depth of what is left is one less
        # (at most one less where the brackets do not balance).
        shrunk = s.replace(b"()", b"")
        if len(shrunk) == len(s):
            break
        passes += 1
        halved = len(shrunk) * 2 <= len(s)
        s = shrunk
        if not halved:
            break
    if passes > limit or not s:
        return passes
    return passes + _peak(s, limit - passes)


def _peak(parens: bytes, limit: int) -> int:
    """The highest running sum of +1 per `(` and -1 per `)`, stopping once it passes `limit`."""
    signs = memoryview(parens.translate(_SIGNS)).cast("b")
    level = deepest = 0
    for start in range(0, len(signs), DEPTH_SLICE):
        part = signs[start:start + DEPTH_SLICE]
        peak = max(itertools.accumulate(part, initial=level))
        if peak > deepest:
            deepest = peak
            if deepest > limit:
                break
        level += sum(part)
    return deepest


def max_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of `body` read as JSON, as depth_of counts it. Never recurses."""
    return depth_of(structure(body), limit)


def check(body: bytes) -> dict:
    """The body as a JSON object, or GatewayError 400 (see the module docstring)."""
    if not body:
        raise _invalid("the body is empty; a JSON object is expected")
    kept = body.translate(None, _NOT_STRUCTURAL_OR_BACKSLASH)
    if kept.count(b"[") + kept.count(b"{") > MAX_JSON_DEPTH:
        parens = structure(body, kept)
        opened = parens.count(b"(")
        if opened > MAX_JSON_CONTAINERS:
            # Too deep as well? Told from a bounded prefix, so the answer costs little.
            if _peak(parens[:2 * MAX_JSON_CONTAINERS], MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
                raise _too_deep()
            raise GatewayError(400, f"JSON body has more than {MAX_JSON_CONTAINERS} arrays and "
                                    "objects", "json_too_many_containers")
        if len(parens) > 2 * opened:
            raise _invalid("more closing than opening brackets")
        if depth_of(parens) > MAX_JSON_DEPTH:
            raise _too_deep()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"not UTF-8 (byte {exc.start})") from None
    if text.startswith(_BOM):
        text = text[1:]
    try:
        obj = _parse(text)
    except json.JSONDecodeError as exc:
        raise _invalid(f"{exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:          # NaN / Infinity; an integer of more than 4,300 digits
        raise _invalid(str(exc)) from None
    if type(obj) is not dict:
        raise GatewayError(400, "The JSON body must be an object", "json_not_object")
    if _SURROGATE_ESCAPE.search(text) is not None:
        for m in _ESCAPES.finditer(text):
            if m.end() - m.start() == _LONE_SURROGATE_LEN:
                raise _invalid(f"lone UTF-16 surrogate escape {m.group()} "
                               f"(character {m.start()})")
    return obj
