"""The route table (api/routes.py): each route carries its facts, and they agree with each other."""

from __future__ import annotations

import inspect

import pytest

from llamagw.api import routes
from llamagw.errors import Envelope, GatewayError
from llamagw.limits.admission import Auth
from llamagw.net import relay

ALL = list(routes.ROUTES.values())


def test_the_table_is_the_per_api_tables_keyed_by_method_and_path():
    tables = (routes.OPENAI_ROUTES, routes.LOCAL_ROUTES, routes.OLLAMA_ROUTES,
              routes.ADMIN_ROUTES, routes.UI_ROUTES)
    assert sorted(routes.ROUTES) == sorted(r.key for t in tables for r in t)
    assert all(key == (r.method, r.path) for key, r in routes.ROUTES.items())
    with pytest.raises(ValueError, match="defined twice"):
        routes.table(routes.LOCAL_ROUTES, routes.LOCAL_ROUTES[:1])


@pytest.mark.parametrize("route", ALL + list(routes.PREFLIGHTS.values()),
                         ids=lambda r: f"{r.method} {r.path}")
def test_every_route_has_an_async_handler_and_enum_facts(route):
    assert inspect.iscoroutinefunction(route.handler)
    assert isinstance(route.auth, Auth) and isinstance(route.envelope, Envelope)
    assert route.name and (route.path.startswith("/") or route.path == "*")


def test_proxied_routes_are_the_openai_api_relayed_with_a_key():
    proxied = [r for r in ALL if r.upstream]
    # /v1/models is the gateway's own in router mode (the catalog, scoped to the key)
    assert proxied == [r for r in routes.OPENAI_ROUTES if r.path != "/v1/models"]
    for r in proxied:
        assert r.handler is relay.proxy and r.upstream == r.path and not r.local
        assert (r.auth, r.envelope) == (Auth.KEY, Envelope.OPENAI)
        assert r.model and r.lease and r.json_body          # each names its model
    assert all(r.handler is not relay.proxy for r in ALL if not r.upstream)
    listing = routes.ROUTES[("GET", "/v1/models")]
    assert not listing.model and not listing.lease and not listing.local


def test_model_routes_are_the_inference_routes():
    assert {r.path for r in ALL if r.model} == {
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize",
        "/detokenize", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings"}
    # the Ollama handlers lease the model themselves (an empty prompt loads or unloads it)
    assert {r.path for r in ALL if r.lease} == {r.path for r in ALL if r.upstream}


def test_ollama_routes_answer_in_ollama_shape_and_only_inference_takes_a_slot():
    for r in routes.OLLAMA_ROUTES:
        assert r.envelope is Envelope.OLLAMA and routes.envelope_for(r.path) is Envelope.OLLAMA
    busy = {r.path for r in ALL if not r.local}
    assert busy == {r.path for r in routes.OPENAI_ROUTES} | {
        "/api/chat", "/api/generate", "/api/embed", "/api/embeddings"}
    assert {r.path for r in ALL if r.streams} == {
        "/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate",
        "/admin/events", "/admin/live", "/api/pull", "/admin/models/pull"}


def test_open_routes_are_only_the_probes_the_dashboards_files_and_its_way_in():
    ui = {r.path for r in routes.UI_ROUTES}
    assert ui >= {"/ui", "/ui/", "/ui/app.js", "/favicon.ico"}
    assert {r.path for r in ALL if r.auth is Auth.NONE} == {
        "/ping", "/health", "/", "/api/version", "/admin/setup", "/admin/session"} | ui
    assert [r.method for r in ALL if r.auth is Auth.NONE and r.path == "/admin/session"] == [
        "POST"]
    assert [r.path for r in ALL if r.auth is Auth.METRICS] == ["/metrics"]


def test_admin_routes_deny_by_default():
    way_in = {("GET", "/admin/setup"), ("POST", "/admin/session")}
    for r in routes.ADMIN_ROUTES:
        assert r.envelope is Envelope.ADMIN and r.path.startswith("/admin/"), r
        assert r.auth is (Auth.NONE if r.key in way_in else Auth.ADMIN), r
        assert not r.cors and r.headers and r.name.startswith("admin"), r
    # every /admin/ route of the whole table is an ADMIN_ROUTES row (a row added elsewhere
    # would escape the walk of tests/test_admin_api.py)
    assert {r.key for r in ALL if r.path.startswith("/admin/")} == {
        r.key for r in routes.ADMIN_ROUTES}
    assert routes.envelope_for("/admin/api/anything") is Envelope.ADMIN
    assert routes.envelope_for("/ui/nothing") is Envelope.ADMIN


def test_admin_and_dashboard_routes_are_same_origin_only():
    for r in ALL:
        assert r.cors is (r.envelope is not Envelope.ADMIN), r
    assert not routes.PREFLIGHTS[Envelope.ADMIN].cors
    leaky = routes.Route("GET", "/admin/x", "admin_x", routes.local.ping, Auth.ADMIN,
                         Envelope.ADMIN)
    with pytest.raises(ValueError, match="same-origin"):
        routes.table((leaky,))


def test_match_head_options_404_405():
    assert routes.match("HEAD", "/v1/models") is routes.ROUTES[("GET", "/v1/models")]
    assert routes.match("OPTIONS", "/api/chat") is routes.PREFLIGHTS[Envelope.OLLAMA]
    assert routes.match("OPTIONS", "/v1/nope").envelope is Envelope.OPENAI
    with pytest.raises(GatewayError) as info:
        routes.match("GET", "/v1/models/")
    assert info.value.status == 404
    with pytest.raises(GatewayError) as info:
        routes.match("DELETE", "/v1/models")
    assert info.value.status == 405 and info.value.headers == [("allow", "GET, HEAD")]
    assert routes.allowed_methods("/api/delete") == ["DELETE"]
