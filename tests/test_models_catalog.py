"""llamagw.models.catalog: the gateway's model catalog from router /models snapshots and SSE
events; names, scoping, failure back-off (injected clock), in-flight counts, stale input."""

from __future__ import annotations

import json

import pytest

from llamagw.models import catalog as catalog_mod
from llamagw.models.catalog import Catalog, CatalogError, State, parse_key_models

BIN = "/opt/llama/bin/llama-server"


def entry(name, value="unloaded", *, aliases=(), failed=False, exit_code=None, meta=None,
          source="preset"):
    status = {"value": value,
              "args": [BIN, "--port", "0", "--alias", name, "--model", f"/data/models/{name}.gguf"],
              "preset": f"[{name}]\nmodel = /data/models/{name}.gguf\n\n"}
    if failed:
        status["failed"] = True
        status["exit_code"] = 1 if exit_code is None else exit_code
    e = {"id": name, "aliases": list(aliases), "tags": [], "object": "model",
         "owned_by": "llamacpp", "created": 1, "status": status, "source": source,
         "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]}}
    if meta:
        e["meta"] = meta
    return e


def models_body(*entries) -> bytes:
    return json.dumps({"data": list(entries), "object": "list"}).encode()


META = {"n_ctx": 1024, "n_ctx_train": 4096, "n_params": 2130240, "size": 4261120,
        "ftype": "F16", "n_vocab": 32000}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cat(clock):
    c = Catalog(clock=clock, wall=lambda: 1_700_000_000.0, backoff_initial=10,
                backoff_max=40)
    c.replace(models_body(entry("alpha", "loaded", meta=META),
                          entry("beta", aliases=["b1", "second"]),
                          entry("gamma", "sleeping"),
                          entry("broken", failed=True)))
    return c


def event(name, kind="status_change", **data):
    return {"model": name, "event": kind, "data": data}


# ---- snapshot ---------------------------------------------------------------------------------------

def test_snapshot_states(cat):
    states = {m.name: (m.state, m.router_state) for m in cat.models()}
    assert states == {"alpha": (State.LOADED, "loaded"), "beta": (State.UNLOADED, "unloaded"),
                      "gamma": (State.LOADED, "sleeping"),       # alive: counts as loaded
                      "broken": (State.FAILED, "unloaded")}
    assert cat.get("broken").failure == "llama-server's instance exited with code 1"
    assert cat.synced


def test_public_view_holds_no_paths_or_command_line(cat):
    shown = json.dumps([cat.public(n) for n in cat.names()])
    assert "/" not in shown and "--" not in shown and "preset" not in shown
    alpha = cat.public("alpha")
    assert alpha["state"] == "loaded" and alpha["size"] == 4261120
    assert alpha["quantization"] == "F16" and alpha["context"] == 1024
    assert alpha["in_flight"] == 0 and alpha["last_used"] is None
    assert set(alpha) >= {"name", "state", "size", "quantization", "context", "in_flight",
                          "last_used", "failure"}
    assert cat.public("broken")["failure"] and cat.public("broken")["retry_after"] == 10


def test_meta_is_kept_after_unload(cat):
    cat.apply_event(event("alpha", status="unloaded", exit_code=0))
    assert cat.get("alpha").state is State.UNLOADED
    assert cat.public("alpha")["size"] == 4261120


def test_cache_models_and_unservable_names_are_not_listed():
    c = Catalog()
    c.replace(models_body(entry("alpha"), entry("org/repo:Q4_K_M", source="cache"),
                          entry("with space"), entry("hf-thing", source="cache")))
    assert c.names() == ["alpha"]


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"data": 3}', b"[]"])
def test_bad_snapshot_is_an_error(body):
    with pytest.raises(CatalogError):
        Catalog().replace(body)


def test_oversized_snapshot_is_refused():
    with pytest.raises(CatalogError, match="larger than"):
        Catalog().replace(b" " * (catalog_mod.MAX_MODELS_BODY + 1))


def test_gone_models_are_dropped_unless_requests_are_in_flight(cat):
    cat.acquire("alpha")
    cat.replace(models_body(entry("beta")))
    assert cat.names() == ["alpha", "beta"]          # alpha kept until released
    cat.release("alpha")
    cat.replace(models_body(entry("beta")))
    assert cat.names() == ["beta"]
    assert cat.resolve("alpha") is None


# ---- names -------------------------------------------------------------------------------------------

def test_resolve_names_and_aliases_case_sensitive(cat):
    assert cat.resolve("beta") == "beta"
    assert cat.resolve("b1") == "beta" and cat.resolve("second") == "beta"
    assert cat.resolve("alpha:latest") == "alpha"          # Ollama clients add a tag
    assert cat.resolve("b1:latest") == "beta"
    for unknown in ("Beta", "B1", "delta", "", None, 7, "alpha:7b"):
        assert cat.resolve(unknown) is None


def test_an_alias_never_shadows_a_model_name():
    c = Catalog()
    c.replace(models_body(entry("alpha", aliases=["beta", "a1"]), entry("beta"),
                          entry("gamma", aliases=["a1"])))
    assert c.resolve("beta") == "beta"
    assert c.resolve("a1") == "alpha"        # first model (sorted) wins a duplicate alias


# ---- scoping -----------------------------------------------------------------------------------------

def test_key_scoping_by_name_or_alias(cat):
    assert cat.allowed(None, "beta")
    scoped = parse_key_models("alpha,b1")
    assert cat.allowed(scoped, "alpha") and cat.allowed(scoped, "beta")
    assert cat.allowed(scoped, "second")                   # any name of an allowed model
    assert not cat.allowed(scoped, "gamma") and not cat.allowed(scoped, "nope")
    assert [m.name for m in cat.visible(scoped)] == ["alpha", "beta"]
    assert [m.name for m in cat.visible(None)] == ["alpha", "beta", "broken", "gamma"]
    assert [m.name for m in cat.loaded(scoped)] == ["alpha"]
    assert [m.name for m in cat.loaded(None)] == ["alpha", "gamma"]
    assert [m["name"] for m in cat.snapshot(scoped)] == ["alpha", "beta"]


@pytest.mark.parametrize("value", ["", "a,,b", "a b", "a,/etc"])
def test_parse_key_models_refuses_bad_lists(value):
    with pytest.raises(ValueError):
        parse_key_models(value)


# ---- events ------------------------------------------------------------------------------------------

def test_events_follow_a_load(cat):
    seen = []
    cat.listeners.append(seen.append)
    assert cat.apply_event(event("beta", "model_status", status="loading")) == {"beta"}
    assert cat.get("beta").state is State.LOADING
    cat.apply_event(event("beta", status="loading",
                          progress={"stages": ["text_model"], "value": 0.5}))
    assert cat.public("beta")["progress"] == 0.5
    cat.apply_event(event("beta", status="loaded", info={"id": "beta", "meta": META}))
    m = cat.get("beta")
    assert m.state is State.LOADED and m.meta["n_ctx"] == 1024
    assert cat.public("beta")["progress"] is None
    assert seen == [{"beta"}, {"beta"}, {"beta"}]


def test_exit_code_while_loading_is_a_failure_with_backoff(cat, clock):
    cat.apply_event(event("beta", "model_status", status="loading"))
    cat.apply_event(event("beta", status="unloaded", exit_code=1))
    m = cat.get("beta")
    assert m.state is State.FAILED and "failed to load" in m.failure
    assert cat.backoff_left("beta") == 10
    clock.t += 4
    assert cat.backoff_left("beta") == 6
    clock.t += 6
    assert cat.backoff_left("beta") == 0
    assert m.state is State.FAILED                 # still shown failed, but may be retried


def test_crash_of_a_loaded_model_is_a_failure(cat):
    cat.apply_event(event("alpha", status="unloaded", exit_code=1))
    assert cat.get("alpha").state is State.FAILED
    assert "exited with code 1" in cat.get("alpha").failure


def test_normal_unload_is_not_a_failure(cat):
    cat.apply_event(event("alpha", status="unloaded", exit_code=0))
    assert cat.get("alpha").state is State.UNLOADED and cat.get("alpha").failures == 0


def test_an_exit_the_gateway_asked_for_is_not_a_failure(cat):
    cat.mark_stopping("alpha")
    assert cat.public("alpha")["draining"]
    # a stop of a busy instance is forced after stop-timeout: exit 1, failed (ROUTER-MODE §4)
    cat.apply_event(event("alpha", status="unloaded", exit_code=1))
    m = cat.get("alpha")
    assert m.state is State.UNLOADED and m.failures == 0 and not m.stopping


def test_backoff_doubles_to_its_cap_and_resets_on_success(cat, clock):
    delays = []
    for _ in range(4):
        cat.mark_loading("beta")
        cat.apply_event(event("beta", "model_status", status="loading"))
        cat.apply_event(event("beta", status="unloaded", exit_code=1))
        delays.append(cat.backoff_left("beta"))
        clock.t += 100
    assert delays == [10, 20, 40, 40]
    assert cat.get("beta").failures == 4
    assert not cat.may_evict_for("beta")
    cat.mark_loading("beta")
    cat.apply_event(event("beta", "model_status", status="loading"))
    cat.apply_event(event("beta", status="loaded"))
    m = cat.get("beta")
    assert m.failures == 0 and m.failure == "" and cat.backoff_left("beta") == 0
    assert cat.may_evict_for("beta")


def test_may_evict_only_for_the_first_retry(cat):
    assert cat.may_evict_for("beta")
    cat.record_failure("beta", "llama-server refused to load it")
    assert cat.may_evict_for("beta")                       # 1 failure: one retry may evict
    cat.record_failure("beta", "again")
    assert not cat.may_evict_for("beta")


def test_repeated_failed_snapshot_does_not_count_again(cat, clock):
    body = models_body(entry("broken", failed=True))
    for _ in range(3):
        clock.t += 1
        cat.replace(body)
    assert cat.get("broken").failures == 1


@pytest.mark.parametrize("ev", [
    {"model": "delta", "event": "status_change", "data": {"status": "loaded"}},
    {"model": "*", "event": "models_reload", "data": {}},
    {"model": "alpha", "event": "model_remove"},
    "nonsense",
])
def test_events_that_need_a_fresh_snapshot(cat, ev):
    assert cat.apply_event(ev) is None


def test_download_events_are_ignored(cat):
    assert cat.apply_event({"model": "x", "event": "download_progress", "data": {}}) == set()


# ---- stale input -------------------------------------------------------------------------------------

def test_stale_events_from_before_our_load_are_ignored(cat):
    cat.apply_event(event("beta", "model_status", status="loading"))
    cat.apply_event(event("beta", status="loaded"))
    cat.mark_stopping("beta")
    cat.apply_event(event("beta", status="unloaded", exit_code=0))
    # a snapshot already showed it unloaded; now the gateway loads it again...
    cat.mark_loading("beta")
    # ...and an old status_change that sat unread in the SSE socket arrives: ignored
    assert cat.apply_event(event("beta", status="unloaded", exit_code=0)) == set()
    assert cat.get("beta").state is State.LOADING
    cat.apply_event(event("beta", "model_status", status="loading"))     # the new spawn
    cat.apply_event(event("beta", status="unloaded", exit_code=1))       # now it counts
    assert cat.get("beta").state is State.FAILED


def test_snapshot_older_than_our_load_request_keeps_the_state(cat):
    epoch = cat.tick()                  # a GET /models sent before the load request...
    cat.mark_loading("beta")
    cat.settle("beta")
    cat.replace(models_body(entry("alpha", "loaded"), entry("beta", aliases=["b1"])),
                epoch=epoch)            # ...answered after it: beta's "unloaded" is old news
    assert cat.get("beta").state is State.LOADING
    assert cat.get("beta").aliases == ("b1",)         # the rest of the entry is taken
    fresh = cat.tick()
    cat.replace(models_body(entry("alpha", "loaded"), entry("beta", "loaded")), epoch=fresh)
    assert cat.get("beta").state is State.LOADED


def test_snapshot_sent_while_our_load_request_is_unanswered_keeps_the_state(cat):
    cat.mark_loading("beta")
    epoch = cat.tick()                  # a GET /models sent while the load is unanswered...
    cat.replace(models_body(entry("alpha", "loaded"), entry("beta")), epoch=epoch)
    assert cat.get("beta").state is State.LOADING      # ...may predate the router's load
    cat.settle("beta")                  # the load answered: snapshots from now on count
    fresh = cat.tick()
    cat.replace(models_body(entry("alpha", "loaded"), entry("beta", "loading")), epoch=fresh)
    assert cat.get("beta").state is State.LOADING and not cat.get("beta").awaiting_spawn
    fresh = cat.tick()
    cat.replace(models_body(entry("alpha", "loaded"), entry("beta")), epoch=fresh)
    assert cat.get("beta").state is State.UNLOADED     # gone after the load: counted


def test_refused_load_request_restores_the_state(cat):
    cat.mark_loading("broken")
    assert cat.get("broken").state is State.LOADING
    cat.settle("broken", spawned=False)
    assert cat.get("broken").state is State.FAILED
    assert not cat.get("broken").awaiting_spawn


# ---- in flight, draining, health -----------------------------------------------------------------------

def test_in_flight_and_last_used(cat):
    seen = []
    cat.listeners.append(seen.append)
    cat.acquire("alpha")
    cat.acquire("alpha")
    assert cat.get("alpha").in_flight == 2
    cat.release("alpha")
    cat.release("alpha")
    cat.release("alpha")                     # never below zero
    assert cat.get("alpha").in_flight == 0
    assert cat.public("alpha")["last_used"] == 1_700_000_000.0
    assert seen == [{"alpha"}] * 5


def test_draining_model_is_not_serving(cat):
    assert cat.get("alpha").serving
    cat.set_draining("alpha", True)
    assert not cat.get("alpha").serving and cat.public("alpha")["draining"]
    cat.set_draining("alpha", False)
    assert cat.get("alpha").serving
    assert {m.name for m in cat.occupied()} == {"alpha", "gamma"}
    assert {m.name for m in cat.occupied(exclude="gamma")} == {"alpha"}


def test_health_from_preload_states(clock):
    c = Catalog(clock=clock)
    assert c.health(["alpha"]) == "starting"           # nothing read yet
    c.replace(models_body(entry("alpha", "loading"), entry("beta")))
    assert c.health(["alpha"]) == "starting"
    assert c.health([]) == "ready"
    c.apply_event(event("alpha", status="loaded"))
    assert c.health(["alpha"]) == "ready"
    assert c.health(["alpha", "beta"]) == "starting"
    c.apply_event(event("beta", "model_status", status="loading"))
    c.apply_event(event("beta", status="unloaded", exit_code=1))
    assert c.health(["alpha", "beta"]) == "failed"
    assert c.health(["delta"]) == "failed"             # a preload model that is not there


def test_update_meta_fills_what_the_router_does_not_know(cat):
    cat.update_meta("beta", size=123, ftype="Q4_K_M", path="/x")
    assert cat.public("beta")["size"] == 123 and cat.public("beta")["quantization"] == "Q4_K_M"
    assert "path" not in cat.get("beta").meta
    cat.update_meta("alpha", size=1)                   # the router's value stays
    assert cat.public("alpha")["size"] == 4261120
