"""jsonguard: the shape of a JSON body measured without recursion, then parsed; what is refused."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from llamagw.errors import GatewayError
from llamagw.wire import jsonguard
from llamagw.wire.jsonguard import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, check, max_depth

CHAT = b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
# The issue's body: 200,000 objects deep (1.2 MB) under a normal chat request.
CRASH_DEPTH = 200_000


def crash_body(depth: int = CRASH_DEPTH) -> bytes:
    return (b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"x":'
            + b'{"a":' * depth + b"1" + b"}" * depth + b"}")


def nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    """An object whose "x" holds containers nesting the whole body `depth` deep."""
    inner = depth - 1
    if opener == b"{":
        return b'{"x":' + b'{"a":' * inner + b"1" + b"}" * inner + b"}"
    return b'{"x":' + opener * inner + closer * inner + b"}"


def refused(body: bytes) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        check(body)
    err = info.value
    assert err.status == 400 and err.error_type == "invalid_request_error" and err.message
    return err


def true_depth(obj) -> int:
    """Depth of a parsed value (iterative)."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict)
                                                   else value))
    return deepest


def reference_depth(text: bytes) -> int:
    """A byte-by-byte JSON lexer's running depth, up to the first backslash outside a string
    (where json.loads stops): the most json.loads could descend."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x5C:
            break
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


# ------------------------------------------------------------------ accepted
def test_a_chat_body_is_parsed_and_returned():
    assert check(CHAT) == json.loads(CHAT)
    assert max_depth(CHAT) == 3


@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b"{", b"}")])
def test_depth_at_the_limit_passes_one_over_is_refused(opener, closer):
    ok = nested(MAX_JSON_DEPTH, opener, closer)
    assert max_depth(ok) == MAX_JSON_DEPTH == true_depth(json.loads(ok))
    assert check(ok)["x"]
    over = nested(MAX_JSON_DEPTH + 1, opener, closer)
    assert max_depth(over) > MAX_JSON_DEPTH
    assert refused(over).code == "json_too_deep"


def test_mixed_arrays_and_objects_count_alike():
    half = MAX_JSON_DEPTH // 2
    ok = b'{"x":' + b'[{"a":' * half + b"1" + b"}]" * half + b"}"
    assert true_depth(json.loads(ok)) == MAX_JSON_DEPTH + 1
    assert refused(ok).code == "json_too_deep"
    ok = b'{"x":' + b'[{"a":' * (half - 1) + b"[1]" + b"}]" * (half - 1) + b"}"
    assert true_depth(json.loads(ok)) == MAX_JSON_DEPTH
    check(ok)


def test_brackets_inside_strings_do_not_count():
    text = "[" * 5000 + "{" * 5000 + "]]]]}" * 300
    body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
    assert max_depth(body) == 3
    assert check(body)["messages"][0]["content"] == text


@pytest.mark.parametrize("text", [
    '"[[[',                       # an escaped quote, then brackets still inside the string
    '\\',                         # an escaped backslash right before the closing quote
    '\\"{{{',                     # escaped backslash, escaped quote, brackets in the string
    '\\\\\\"[[[',                 # three escaped backslashes then an escaped quote
    'a\\nb"\\t"[{[{',             # other escapes between
])
def test_escapes_are_read_as_json_reads_them(text):
    body = json.dumps({"a": text, "b": [[[1]]], "c": text + "[" * 200}).encode()
    assert max_depth(body) == 4
    assert check(body)["a"] == text


@pytest.mark.parametrize("escapes", [10, jsonguard.REGEX_ESCAPES_MAX + 1])
def test_both_escape_passes_agree(escapes):
    """Few backslashes: one regex pass; many: two bytes.replace passes. Same reading."""
    content = '\\"[' * escapes + "\\" + '"{' * 3
    deep = MAX_JSON_DEPTH + 1
    body = json.dumps({"a": content, "x": json.loads(nested(deep - 1))}).encode()
    assert body.count(b"\\") > escapes
    assert true_depth(json.loads(body)) == deep
    assert max_depth(body) == deep
    assert refused(body).code == "json_too_deep"
    body = json.dumps({"a": content, "x": json.loads(nested(MAX_JSON_DEPTH - 1))}).encode()
    assert check(body)["a"] == content


def test_schemas_in_tools_pass():
    schema: dict = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"p": {"anyOf": [schema, {"type": "null"}]}}}
    body = json.dumps({"messages": [{"role": "user", "content": "x"}],
                       "tools": [{"type": "function",
                                  "function": {"name": "f", "parameters": schema}}] * 20}).encode()
    assert 80 < max_depth(body) <= MAX_JSON_DEPTH
    check(body)


def test_a_valid_surrogate_pair_and_an_escaped_backslash_before_ud800_pass():
    assert check(b'{"a":"\\ud83d\\ude00"}')["a"] == "\U0001F600"
    assert check(b'{"a":"\\\\ud800"}')["a"] == "\\ud800"
    assert check('{"a":"h\u00e9llo \u2603 \U0001F600"}'.encode())["a"].endswith("\U0001F600")


def test_a_byte_order_mark_is_skipped_as_llama_server_skips_it():
    assert check(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


def test_whitespace_around_the_object_is_json():
    assert check(b' \r\n\t{"a": [1, {"b": null}]} \n') == {"a": [1, {"b": None}]}
    assert check(b'{"a": 1}\r\n') == {"a": 1}
    assert "Extra data" in refused(b'{"a": 1}\n\x0b').message     # not JSON whitespace


# ------------------------------------------------------------------ refused
@pytest.mark.parametrize("body", [b"[]", b"[{}]", b"1", b'"x"', b"null", b"true"])
def test_a_top_level_that_is_not_an_object_is_refused(body):
    assert refused(body).code == "json_not_object"


@pytest.mark.parametrize("body,why", [
    (b"", "empty"),
    (b"  \n", "Expecting value"),
    (b"{", "Expecting property name"),
    (b'{"a":}', "Expecting value"),
    (b'{"a":1} x', "Extra data"),
    (b'{"a":1}{}', "Extra data"),
    (b"{'a':1}", "double quotes"),
    (b'{"a":NaN}', "NaN"),
    (b'{"a":Infinity}', "Infinity"),
    (b'{"a":-Infinity}', "Infinity"),
    (b'{"a":"\xff"}', "not UTF-8"),
    (b'{"a":"\xed\xa0\x80"}', "not UTF-8"),           # a surrogate encoded in UTF-8
    (b'\xef\xbb\xbf\xef\xbb\xbf{"a":1}', "Expecting value"),   # one byte order mark is skipped
    (b'{"a":"x\ny"}', "control character"),
    (b'{"a":"\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"a":"\\udc00"}', "lone UTF-16 surrogate"),
    (b'{"a":"\\uDBFFx"}', "lone UTF-16 surrogate"),
    (b'{"a":"\\ud800\\u0041"}', "lone UTF-16 surrogate"),
    (b'{"a":"\\\\\\ud800"}', "lone UTF-16 surrogate"),  # an escaped backslash, then the escape
    (b'{"a":' + b"[]" * MAX_JSON_DEPTH + b"}" * (MAX_JSON_DEPTH + 2), "more closing than"),
])
def test_invalid_json_is_refused(body, why):
    err = refused(body)
    assert err.code == "invalid_json" and why in err.message, err.message


def test_too_many_containers_refused_at_the_limit_plus_one():
    def body(inner: int) -> bytes:           # the top object + one array + `inner` objects
        return b'{"a":[' + b",".join([b"{}"] * inner) + b"]}"
    assert len(check(body(MAX_JSON_CONTAINERS - 2))["a"]) == MAX_JSON_CONTAINERS - 2
    err = refused(body(MAX_JSON_CONTAINERS - 1))
    assert err.code == "json_too_many_containers" and str(MAX_JSON_CONTAINERS) in err.message


def test_the_crash_body_is_refused_without_recursion_and_quickly():
    """200,000 deep, checked on a thread with a 256 KiB stack: any recursion would overflow it
    (json.loads alone raises RecursionError long before)."""
    body = crash_body()
    with pytest.raises(RecursionError):
        json.loads(body)
    result: list = []

    def run():
        started = time.monotonic()
        try:
            check(body)
        except GatewayError as err:
            result.append((err.code, time.monotonic() - started))
    old = threading.stack_size(256 * 1024)
    try:
        t = threading.Thread(target=run)
        t.start()
    finally:
        threading.stack_size(old)
    t.join(10)
    assert result and result[0][0] == "json_too_deep"
    assert result[0][1] < 1.0, result


@pytest.mark.parametrize("body", [
    b"[" * 3_000_000,
    b'{"a":' * 1_000_000,
    b'{"a":[' + b"[" * 1_000_000,
])
def test_huge_unclosed_bodies_are_refused_without_parsing(body):
    assert refused(body).code == "json_too_deep"


# ------------------------------------------------------------------ the count itself
def _random_value(rng: random.Random, depth: int):
    """A random JSON value; strings full of brackets, quotes and backslashes."""
    kind = rng.random()
    if depth <= 0 or kind < 0.3:
        return rng.choice([1, -2.5, True, None, "".join(
            rng.choice('ab[]{}"\\\n/u') for _ in range(rng.randrange(8)))])
    if kind < 0.65:
        return [_random_value(rng, depth - 1) for _ in range(rng.randrange(4))]
    return {"".join(rng.choice('k[{"\\') for _ in range(3)): _random_value(rng, depth - 1)
            for _ in range(rng.randrange(4))}


def test_max_depth_equals_the_true_depth_of_random_documents():
    rng = random.Random(25)
    for _ in range(400):
        doc = {"x": _random_value(rng, rng.randrange(1, 12))}
        for ensure_ascii in (True, False):
            body = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
            assert max_depth(body, limit=10_000) == true_depth(doc), body


def test_max_depth_never_undercounts_what_json_would_descend():
    """Truncated, spliced or corrupted bodies: at least the lexer's depth (json.loads stops at
    the first byte it refuses, so it never descends further than that)."""
    rng = random.Random(4)
    for _ in range(600):
        body = bytearray(json.dumps({"x": _random_value(rng, rng.randrange(1, 10))}).encode())
        for _ in range(rng.randrange(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(body) + 1)
            if op < 0.4:
                body.insert(pos, rng.choice(b'[]{}"\\,'))
            elif op < 0.7 and body:
                del body[min(pos, len(body) - 1)]
            else:
                del body[pos:]
        data = bytes(body)
        assert max_depth(data, limit=10_000) >= reference_depth(data), data
