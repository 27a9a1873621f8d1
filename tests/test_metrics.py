"""metrics.py: counters, histograms, gauges; Prometheus 0.0.4 text checked line by line by a
small parser written from the format description; JSON; bounded label cardinality."""

from __future__ import annotations

import json
import math
import re

import pytest

from llamagw.observe import metrics
from llamagw.observe.metrics import LATENCY_BUCKETS, TTFB_BUCKETS, Metrics

NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
VALUE_RE = re.compile(r"[+-]?(?:[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|Inf|NaN)")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def parse_labels(text: str, pos: int) -> tuple[dict[str, str], int]:
    """Parse `{name="value",...}` starting at text[pos] == '{'. Returns (labels, end pos)."""
    assert text[pos] == "{"
    pos += 1
    labels: dict[str, str] = {}
    while text[pos] != "}":
        m = LABEL_NAME_RE.match(text, pos)
        assert m, f"bad label name at {text[pos:]!r}"
        name = m.group(0)
        pos = m.end()
        assert text[pos:pos + 2] == '="', text
        pos += 2
        value = []
        while text[pos] != '"':
            ch = text[pos]
            assert ch != "\n"
            if ch == "\\":
                nxt = text[pos + 1]
                assert nxt in '\\"n', f"bad escape \\{nxt}"
                value.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
                pos += 2
            else:
                value.append(ch)
                pos += 1
        pos += 1
        assert name not in labels, f"label {name} twice"
        labels[name] = "".join(value)
        if text[pos] == ",":
            pos += 1
    return labels, pos + 1


def parse_exposition(body: bytes) -> dict:
    """Validate text format 0.0.4 line by line. Returns {family: {"type", "help", "samples"}}
    where samples are (name, labels, value)."""
    text = body.decode("utf-8")
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    seen_series = set()
    for line in text[:-1].split("\n"):
        assert line, "empty line"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if parts[1] == "HELP":
                name = parts[2]
                assert NAME_RE.fullmatch(name)
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                assert fam["help"] is None and not fam["samples"], f"HELP for {name} late/twice"
                fam["help"] = parts[3] if len(parts) > 3 else ""
            elif parts[1] == "TYPE":
                name, kind = parts[2], parts[3]
                assert kind in TYPES
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                assert fam["type"] is None and not fam["samples"], f"TYPE for {name} late/twice"
                fam["type"] = kind
            current = parts[2]
            continue
        m = NAME_RE.match(line)
        assert m, line
        name = m.group(0)
        pos = m.end()
        labels = {}
        if pos < len(line) and line[pos] == "{":
            labels, pos = parse_labels(line, pos)
        assert line[pos] == " ", line
        fields = line[pos + 1:].split(" ")
        assert 1 <= len(fields) <= 2 and VALUE_RE.fullmatch(fields[0]), line
        value = float(fields[0].replace("Inf", "inf"))
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[: -len(suffix)]
            if name.endswith(suffix) and families.get(base, {}).get("type") == "histogram":
                family = base
        fam = families.get(family)
        assert fam is not None and fam["type"], f"sample {name} without TYPE"
        assert family == current, f"sample {name} outside its family block"
        if fam["type"] == "histogram":
            assert name != family, "histogram sample without suffix"
            if name.endswith("_bucket"):
                assert "le" in labels
        series = (name, tuple(sorted(labels.items())))
        assert series not in seen_series, f"duplicate series {series}"
        seen_series.add(series)
        fam["samples"].append((name, labels, value))
    return families


def check_histograms(families: dict) -> None:
    for family, fam in families.items():
        if fam["type"] != "histogram":
            continue
        groups: dict[tuple, dict] = {}
        for name, labels, value in fam["samples"]:
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            g = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
            if name.endswith("_bucket"):
                g["buckets"].append((float(labels["le"].replace("Inf", "inf")), value))
            elif name.endswith("_sum"):
                g["sum"] = value
            else:
                g["count"] = value
        for g in groups.values():
            les = [le for le, _ in g["buckets"]]
            counts = [c for _, c in g["buckets"]]
            assert les == sorted(les) and les[-1] == math.inf
            assert counts == sorted(counts), "buckets must be cumulative"
            assert g["count"] == counts[-1] and g["sum"] is not None


def samples(families, family, name=None) -> dict:
    return {tuple(sorted(lab.items())): v for n, lab, v in families[family]["samples"]
            if n == (name or family)}


# ----------------------------------------------------------------------------------------------
def test_empty_metrics_render_valid_exposition():
    m = Metrics(clock=FakeClock())
    fams = parse_exposition(m.render_prometheus())
    check_histograms(fams)
    expected = {"gateway_requests_total", "gateway_request_duration_seconds",
                "gateway_ttfb_seconds", "gateway_in_flight", "gateway_queue_depth",
                "gateway_rate_limited_total", "gateway_auth_failed_total",
                "gateway_upstream_errors_total", "gateway_tokens_total", "gateway_backend_up",
                "gateway_keys_loaded", "gateway_uptime_seconds",
                "gateway_usage_rows_dropped_total",
                "gateway_model_requests_total", "gateway_model_state",
                "gateway_model_in_flight", "gateway_model_queue_depth"}
    assert set(fams) == expected
    assert all(f["help"] and f["type"] for f in fams.values())
    assert samples(fams, "gateway_auth_failed_total") == {(): 0}


def test_full_render_parses_and_has_the_right_numbers():
    clock = FakeClock(1000.0)
    m = Metrics(clock=clock)
    m.set_known_keys({"alice", "bob"})
    m.observe_request("/v1/chat/completions", 200, "alice", 0.004, 0.002)
    m.observe_request("/v1/chat/completions", 200, "alice", 0.005, 0.01)   # == bound: le
    m.observe_request("/v1/chat/completions", 429, "bob", 1000.0, None)    # above all bounds
    m.observe_request("/health", 401, None, 0.001, 0.001)
    m.inc_rate_limited("bob")
    m.inc_auth_failed()
    m.inc_auth_failed()
    m.inc_upstream_error("connect")
    m.add_tokens("alice", 10, 20, "qwen")
    m.add_tokens("alice", 1, 0, "qwen")
    m.add_tokens("alice", 2, 3)                  # no model known
    m.in_flight = 3
    m.set_gauge_sources(queue_depth=lambda: 5, backend_up=lambda: 1, keys_loaded=lambda: 2)
    m.set_counter_sources(usage_rows_dropped=lambda: 7)
    clock.t = 1042.5
    body = m.render_prometheus()
    fams = parse_exposition(body)
    check_histograms(fams)

    req = samples(fams, "gateway_requests_total")
    assert req == {
        (("key_id", "alice"), ("route", "/v1/chat/completions"), ("status", "200")): 2,
        (("key_id", "bob"), ("route", "/v1/chat/completions"), ("status", "429")): 1,
        (("key_id", "-"), ("route", "/health"), ("status", "401")): 1,
    }
    buckets = samples(fams, "gateway_request_duration_seconds",
                      "gateway_request_duration_seconds_bucket")
    chat = (("le", "0.005"), ("route", "/v1/chat/completions"))
    assert buckets[chat] == 2
    assert buckets[(("le", "300"), ("route", "/v1/chat/completions"))] == 2
    assert buckets[(("le", "+Inf"), ("route", "/v1/chat/completions"))] == 3
    assert len([k for k in buckets if ("route", "/health") in k]) == len(LATENCY_BUCKETS) + 1
    sums = samples(fams, "gateway_request_duration_seconds", "gateway_request_duration_seconds_sum")
    assert sums[(("route", "/v1/chat/completions"),)] == pytest.approx(1000.009)
    ttfb_count = samples(fams, "gateway_ttfb_seconds", "gateway_ttfb_seconds_count")
    assert ttfb_count[(("route", "/v1/chat/completions"),)] == 2  # None is not observed
    ttfb_buckets = samples(fams, "gateway_ttfb_seconds", "gateway_ttfb_seconds_bucket")
    assert len([k for k in ttfb_buckets if ("route", "/health") in k]) == len(TTFB_BUCKETS) + 1
    assert samples(fams, "gateway_rate_limited_total") == {(("key_id", "bob"),): 1}
    assert samples(fams, "gateway_auth_failed_total") == {(): 2}
    assert samples(fams, "gateway_upstream_errors_total") == {(("kind", "connect"),): 1}
    assert samples(fams, "gateway_tokens_total") == {
        (("key_id", "alice"), ("kind", "prompt"), ("model", "qwen")): 11,
        (("key_id", "alice"), ("kind", "completion"), ("model", "qwen")): 20,
        (("key_id", "alice"), ("kind", "prompt"), ("model", "-")): 2,
        (("key_id", "alice"), ("kind", "completion"), ("model", "-")): 3}
    assert samples(fams, "gateway_usage_rows_dropped_total") == {(): 7}
    assert samples(fams, "gateway_in_flight") == {(): 3}
    assert samples(fams, "gateway_queue_depth") == {(): 5}
    assert samples(fams, "gateway_backend_up") == {(): 1}
    assert samples(fams, "gateway_keys_loaded") == {(): 2}
    assert samples(fams, "gateway_uptime_seconds") == {(): 42.5}


def test_label_values_are_escaped():
    m = Metrics(clock=FakeClock())
    nasty = 'a"b\\c\nd}{,e="f"'
    m.observe_request(nasty, 200, "-", 0.1, 0.1)
    m.inc_upstream_error('x"\n\\')
    body = m.render_prometheus()
    assert b'route="a\\"b\\\\c\\nd}{,e=\\"f\\""' in body
    fams = parse_exposition(body)
    check_histograms(fams)
    (labels,) = samples(fams, "gateway_requests_total")
    assert dict(labels)["route"] == nasty  # round trip through the parser
    assert dict(next(iter(samples(fams, "gateway_upstream_errors_total"))))["kind"] == 'x"\n\\'
    assert metrics.escape_label_value('\\"\n') == '\\\\\\"\\n'


def test_key_labels_bounded_by_known_keys():
    m = Metrics(clock=FakeClock())
    m.set_known_keys({"alice"})
    m.observe_request("/r", 200, "alice", 0.1, None)
    m.observe_request("/r", 200, "mallory-made-this-up", 0.1, None)
    m.observe_request("/r", 200, "", 0.1, None)
    m.inc_rate_limited("someone")
    m.add_tokens("other", 1, 1)
    keys = {dict(lab)["key_id"] for lab in samples(parse_exposition(m.render_prometheus()),
                                                   "gateway_requests_total")}
    assert keys == {"alice", "unknown", "-"}
    data = json.loads(m.render_json())
    assert set(data["rate_limited"]) == {"unknown"} and set(data["tokens"]) == {"unknown"}
    # a reload removes alice: her series go, memory stays bounded by the key file
    m.set_known_keys({"bob"})
    keys = {dict(lab)["key_id"] for lab in samples(parse_exposition(m.render_prometheus()),
                                                   "gateway_requests_total")}
    assert keys == {"unknown", "-"}
    m.observe_request("/r", 200, "alice", 0.1, None)
    assert b'key_id="alice"' not in m.render_prometheus()


def test_without_known_keys_labels_are_capped(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_KEY_LABELS", 3)
    m = Metrics(clock=FakeClock())
    for i in range(10):
        m.inc_rate_limited(f"k{i}")
    assert set(json.loads(m.render_json())["rate_limited"]) == {"k0", "k1", "k2", "unknown"}


def test_routes_statuses_and_error_kinds_are_capped():
    m = Metrics(clock=FakeClock())
    for i in range(metrics.MAX_ROUTES + 50):
        m.observe_request(f"/random/{i}", 404, "-", 0.001, None)
    m.observe_request("/x", 9999, "-", 0.001, None)
    for i in range(metrics.MAX_ERROR_KINDS + 10):
        m.inc_upstream_error(f"kind{i}")
    fams = parse_exposition(m.render_prometheus())
    routes = {dict(lab)["route"] for lab in samples(fams, "gateway_requests_total")}
    assert len(routes) == metrics.MAX_ROUTES + 1 and "other" in routes
    statuses = {dict(lab)["status"] for lab in samples(fams, "gateway_requests_total")}
    assert statuses == {"404", "other"}
    kinds = samples(fams, "gateway_upstream_errors_total")
    assert len(kinds) == metrics.MAX_ERROR_KINDS + 1
    assert kinds[(("kind", "other"),)] == 10


def test_broken_gauge_source_does_not_break_the_scrape():
    m = Metrics(clock=FakeClock())

    def broken():
        raise RuntimeError("no")

    m.set_gauge_sources(queue_depth=broken, backend_up=lambda: True, keys_loaded=lambda: 7)
    fams = parse_exposition(m.render_prometheus())
    assert math.isnan(samples(fams, "gateway_queue_depth")[()])
    assert samples(fams, "gateway_backend_up") == {(): 1}
    data = json.loads(m.render_json())
    assert data["queue_depth"] is None and data["keys_loaded"] == 7


def test_bad_durations_keep_sums_finite():
    m = Metrics(clock=FakeClock())
    m.observe_request("/r", 200, "-", float("nan"), float("inf"))
    m.observe_request("/r", 200, "-", -1.0, None)
    data = json.loads(m.render_json())  # strict JSON: would fail on NaN/Infinity
    assert data["request_duration_seconds"]["/r"]["count"] == 2
    assert data["request_duration_seconds"]["/r"]["sum"] == 0


def test_json_rendering():
    clock = FakeClock(0.0)
    m = Metrics(clock=clock)
    m.set_known_keys({"alice"})
    m.observe_request("/v1/models", 200, "alice", 0.02, 0.01)
    m.add_tokens("alice", 3, 4, "m1")
    m.add_tokens("alice", 1, 1, "m2")
    m.inc_auth_failed()
    m.in_flight = 1
    clock.t = 5.0
    data = json.loads(m.render_json())
    assert data["requests"] == [{"route": "/v1/models", "status": "200", "key_id": "alice",
                                 "count": 1}]
    hist = data["request_duration_seconds"]["/v1/models"]
    assert hist["count"] == 1 and hist["buckets"]["0.025"] == 1 and hist["buckets"]["0.01"] == 0
    assert hist["buckets"]["+Inf"] == 1
    assert data["ttfb_seconds"]["/v1/models"]["buckets"]["0.01"] == 1
    assert data["tokens"] == {"alice": {"prompt": 4, "completion": 5}}    # every model
    assert data["tokens_by_model"] == {"alice": {"m1": {"prompt": 3, "completion": 4},
                                                 "m2": {"prompt": 1, "completion": 1}}}
    assert data["usage_rows_dropped"] == 0                           # no ledger: none lost
    assert data["auth_failed"] == 1 and data["in_flight"] == 1
    assert data["uptime_seconds"] == 5.0


@pytest.mark.parametrize("accept, kind", [
    (None, "text/plain; version=0.0.4"),
    ("*/*", "text/plain; version=0.0.4"),
    ("text/plain", "text/plain; version=0.0.4"),
    ("application/json", "application/json"),
    ("Application/JSON; q=1, text/plain;q=0.5", "application/json"),
])
def test_content_negotiation(accept, kind):
    ctype, body = Metrics(clock=FakeClock()).content_for(accept)
    assert ctype.startswith(kind)
    if kind == "application/json":
        json.loads(body)
    else:
        parse_exposition(body)


@pytest.mark.parametrize("value, text", [
    (0, "0"), (3, "3"), (2.5, "2.5"), (1.0, "1"), (1e-3, "0.001"), (math.inf, "+Inf"),
    (-math.inf, "-Inf"), (math.nan, "NaN"), (True, "1"),
])
def test_format_value(value, text):
    assert metrics.format_value(value) == text


def test_buckets_are_sorted_and_distinct():
    for buckets in (LATENCY_BUCKETS, TTFB_BUCKETS):
        assert list(buckets) == sorted(set(buckets)) and buckets[0] > 0


def test_parser_rejects_broken_exposition():
    # the checker itself must fail on bad input, or the tests above prove nothing
    with pytest.raises(AssertionError):
        parse_exposition(b'# TYPE x counter\nx{a="b\\q"} 1\n')       # bad escape
    with pytest.raises(AssertionError):
        parse_exposition(b"y 1\n")                                     # no TYPE
    with pytest.raises(AssertionError):
        parse_exposition(b"# TYPE x counter\nx 1\nx 2\n")              # duplicate series
    with pytest.raises(AssertionError):
        check_histograms(parse_exposition(
            b'# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\n'
            b'h_count 1\n'))                                            # not cumulative


def test_model_labels_are_bounded():
    m = Metrics(clock=FakeClock())
    for i in range(metrics.MAX_MODEL_LABELS + 5):
        m.add_tokens("alice", 1, 0, f"model-{i}")
    models = {dict(lab)["model"] for lab in samples(parse_exposition(m.render_prometheus()),
                                                    "gateway_tokens_total")}
    assert len(models) == metrics.MAX_MODEL_LABELS + 1 and "other" in models
    assert sum(samples(parse_exposition(m.render_prometheus()),
                       "gateway_tokens_total").values()) == metrics.MAX_MODEL_LABELS + 5
def test_model_series_are_catalog_names_with_one_state_each():
    m = Metrics(clock=FakeClock())
    m.observe_model("alpha", 200)
    m.observe_model("alpha", 200)
    m.observe_model("beta", 503)
    m.set_model_source(lambda: [("alpha", "loaded", 2, 0), ("beta", "failed", 0, 3)])
    fams = parse_exposition(m.render_prometheus())
    assert samples(fams, "gateway_model_requests_total") == {
        (("model", "alpha"), ("status", "200")): 2, (("model", "beta"), ("status", "503")): 1}
    states = samples(fams, "gateway_model_state")
    assert states[(("model", "alpha"), ("state", "loaded"))] == 1
    assert states[(("model", "beta"), ("state", "failed"))] == 1
    assert sum(states.values()) == 2 and len(states) == 8      # 2 models x 4 states
    assert samples(fams, "gateway_model_in_flight") == {(("model", "alpha"),): 2,
                                                        (("model", "beta"),): 0}
    assert samples(fams, "gateway_model_queue_depth")[(("model", "beta"),)] == 3
    data = json.loads(m.render_json())
    assert data["models"][1] == {"model": "beta", "state": "failed", "in_flight": 0,
                                 "queue": 3}
    assert {"model": "alpha", "status": "200", "count": 2} in data["model_requests"]

    def broken():
        raise RuntimeError("a bug")
    m.set_model_source(broken)                       # never breaks the scrape
    assert "gateway_model_state" in parse_exposition(m.render_prometheus())
