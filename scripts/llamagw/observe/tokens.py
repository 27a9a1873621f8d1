"""Token counts and model of a llama-server answer, and whether a stream was finished: read from
the end of the relayed bytes (net/relay.Exchange), never by parsing the whole answer.

The counts (usage_counts): prompt, completion and cached prompt tokens. llama-server reports them
in `usage` (prompt_tokens counts the whole prompt, prompt_tokens_details.cached_tokens the part
reused from its cache) and always in `timings` (prompt_n: the prompt tokens it processed, i.e.
WITHOUT the cached ones; cache_n: the cached ones; predicted_n: generated). Seen on the
llama-server the tests run: a prompt of 33 tokens sent twice answers usage.prompt_tokens 33,
cached_tokens 32, timings.prompt_n 1, cache_n 32 the second time.

account() / account_cut() put them on the request context (net/relay.Exchange calls them).

Pure: no I/O. On the hot path (every relayed answer), so a key is found by rfind and only its
object is parsed.
"""

from __future__ import annotations

import json
import re


def _object_key(name: bytes) -> tuple[bytes, re.Pattern]:
    """`"name"` and the pattern of it as an object key whose value is an object: the quote
    before it is not escaped, a colon and an object follow."""
    key = b'"%s"' % name
    return key, re.compile(rb'(?<!\\)' + re.escape(key) + rb'[ \t\r\n]*:[ \t\r\n]*(?=\{)')


_USAGE_KEY = _object_key(b"usage")
_TIMINGS_KEY = _object_key(b"timings")
_JSON_DECODER = json.JSONDecoder()
# A model name longer than this (bytes of its JSON text) is not read: names are short (router
# mode's are at most 128 characters, an alias or a file path a few hundred); the ledger keeps 256.
MAX_MODEL_BYTES = 1024
_MODEL_KEY = b'"model"'
_MODEL_RE = re.compile(rb'(?<!\\)"model"[ \t\r\n]*:[ \t\r\n]*"')


def _last_object(data: bytes, object_key: tuple[bytes, re.Pattern]) -> dict | None:
    """The object value of the last key (_object_key) in JSON text, parsed alone: a few hundred
    bytes, not the whole answer or event (parsing the whole body was ~5% of the gateway's CPU
    on small requests; a stream's final event took 6.7 us against 1.6 us alone).

    Inside a JSON string a quote is escaped, so the pattern only matches a key. llama-server has
    no other object with a `usage` or `timings` key than the answer's (the final event's). None
    when there is none, or the last one is not a whole object of valid UTF-8 JSON."""
    key, key_re = object_key
    pos = data.rfind(key)
    while pos != -1:
        m = key_re.match(data, pos)
        if m is not None:
            try:
                value, _ = _JSON_DECODER.raw_decode(data[m.end():].decode("utf-8"))
            except ValueError:       # UnicodeDecodeError included
                return None
            return value if isinstance(value, dict) else None
        pos = data.rfind(key, 0, pos)
    return None


def usage_from_body(body: bytes) -> dict | None:
    """The `usage` object of a JSON answer."""
    return _last_object(body, _USAGE_KEY)


def sse_finished(tail: bytearray) -> bool:
    """The last SSE event relayed is the OpenAI stream terminator `data: [DONE]`."""
    end = len(tail)
    while end and tail[end - 1] in b"\r\n":
        end -= 1
    start = max(tail.rfind(b"\n", 0, end), tail.rfind(b"\r", 0, end)) + 1
    line = bytes(tail[start:end])
    return line.startswith(b"data:") and line[5:].strip(b" ") == b"[DONE]"


def usage_from_sse_tail(tail: bytes) -> dict | None:
    """Token counts of a stream, from the last SSE event that carries them, as a `usage` object.

    llama-server puts `usage` on the final chunk only when the client asked for
    stream_options.include_usage; its final chunk always carries `timings`, which give the same
    counts: prompt_tokens = prompt_n + cache_n (prompt_n leaves the cached tokens out),
    completion_tokens = predicted_n, cached = cache_n. We never add include_usage to a client's
    request: the extra chunk (with empty `choices`) would change what the client receives."""
    usage = _last_object(tail, _USAGE_KEY)
    if usage is not None:
        return usage
    timings = _last_object(tail, _TIMINGS_KEY)
    if timings is None:
        return None
    prompt = timings.get("prompt_n")
    cached = timings.get("cache_n")
    if type(prompt) is int and type(cached) is int and cached > 0:
        prompt += cached
    out = {"prompt_tokens": prompt, "completion_tokens": timings.get("predicted_n")}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def usage_counts(usage) -> tuple[int | None, int | None, int | None]:
    """(prompt, completion, cached) tokens of a `usage` object: each a whole number >= 0, or None
    where it is missing or not one. cached: prompt_tokens_details.cached_tokens (OpenAI's and
    llama-server's place), else a top-level cached_tokens."""
    if not isinstance(usage, dict):
        return None, None, None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") if isinstance(details, dict)
              else usage.get("cached_tokens"))
    return _count(prompt), _count(completion), _count(cached)


def _count(value) -> int | None:
    return value if type(value) is int and value >= 0 else None


def model_of(data: bytes) -> str | None:
    """The string value of the last `"model"` key in JSON text (an answer, or a stream's last
    event): the model llama-server answered with. None when there is none, or it is empty or
    longer than MAX_MODEL_BYTES, or not valid. Found by rfind, like the counts; a quoted "model"
    inside a string (a generated token) has an escaped quote and is skipped."""
    # The common case first, in few steps: compact JSON as llama-server writes it, a plain name.
    pos = data.rfind(b'"model":"')
    if pos > 0 and data[pos - 1] != 92:            # 92: a backslash (an escaped quote)
        start = pos + 9
        end = data.find(b'"', start, start + MAX_MODEL_BYTES + 1)
        if end > start and data.find(b"\\", start, end) == -1 and \
                data.rfind(_MODEL_KEY, end) == -1:
            try:
                return data[start:end].decode("utf-8")
            except UnicodeDecodeError:
                return None
    return _model_of(data)


def _model_of(data: bytes) -> str | None:
    """model_of for any JSON text: spaces around the colon, escapes in the name."""
    pos = data.rfind(_MODEL_KEY)
    while pos != -1:
        m = _MODEL_RE.match(data, pos)
        if m is not None:
            start = m.end()
            end = data.find(b'"', start, start + MAX_MODEL_BYTES + 1)
            if end == -1:
                return None
            try:
                if data.find(b"\\", start, end) != -1:   # escapes: JSON reads the string
                    text = data[start - 1:start + 2 * MAX_MODEL_BYTES].decode("utf-8", "replace")
                    value, _ = _JSON_DECODER.raw_decode(text)
                    if not isinstance(value, str) or len(value) > MAX_MODEL_BYTES:
                        return None
                else:
                    value = data[start:end].decode("utf-8")
            except ValueError:       # UnicodeDecodeError included
                return None
            return value or None
        pos = data.rfind(_MODEL_KEY, 0, pos)
    return None


def account(ctx, data: bytes, sse: bool = True) -> None:
    """An answer's counts and model onto the request context (ctx.prompt_tokens,
    completion_tokens, cached_tokens, answered_model): `data` is the tail of an SSE stream, or a
    whole JSON body (sse=False). Whole numbers >= 0 only (usage_counts' rule, inlined: every
    relayed answer passes here)."""
    try:
        usage = usage_from_sse_tail(data) if sse else usage_from_body(data)
        model = model_of(data)
    except (ValueError, UnicodeDecodeError):
        return
    if model is not None:
        ctx.answered_model = model
    if usage is not None:
        n = usage.get("prompt_tokens")
        if type(n) is int and n >= 0:
            ctx.prompt_tokens = n
        n = usage.get("completion_tokens")
        if type(n) is int and n >= 0:
            ctx.completion_tokens = n
        if "prompt_tokens_details" in usage or "cached_tokens" in usage:
            ctx.cached_tokens = usage_counts(usage)[2]


def account_cut(ctx, tail: bytearray, events: int) -> None:
    """A stream that ended without its counts (cut: the client left, llama-server closed or went
    silent): what was generated, one completion token per SSE event relayed (llama-server sends
    one per token). Its prompt tokens stay unknown: llama-server reports them at the end only.
    Every event names the model."""
    ctx.completion_tokens = events
    if ctx.answered_model is None:
        ctx.answered_model = model_of(bytes(tail))
