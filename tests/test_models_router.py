"""llamagw.models.router against the fake router over a Unix socket: loads on demand with a
deadline, drain-then-unload, switching under MODELS_MAX, failure back-off, SSE gaps, admin events.

Tests are sync functions wrapping a coroutine (conftest.aio, under TEST_TIMEOUT)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from helpers import aio, eventually
from fakes.fake_router import FakeModel, FakeRouter
from llamagw.models.catalog import Catalog, State
from llamagw.models.router import (ModelFailed, ModelLoading, ModelNotAllowed, ModelNotFound,
                                   RouterClient, RouterController, RouterError, format_sse,
                                   no_autoload)

# Short timings: each rule is shown in well under a second.
FAST = dict(load_wait=2.0, load_timeout=3.0, drain_timeout=2.0, unload_timeout=2.0,
            resync_interval=5.0, poll_interval=0.05, reconnect_initial=0.02,
            reconnect_max=0.1)


class Stack:
    def __init__(self, tmp_path, models, *, models_max=1, backoff=0.3, **kw):
        self.sock = os.path.join(str(tmp_path), "router.sock")
        self.fake = FakeRouter(models, models_max=models_max, unix_path=self.sock)
        opts = dict(FAST)
        opts.update(kw)
        self.catalog = Catalog(backoff_initial=backoff, backoff_max=backoff * 4)
        self.ctl = RouterController(RouterClient(self.sock), models_max=models_max,
                                    catalog=self.catalog, **opts)

    async def __aenter__(self) -> Stack:
        await self.fake.start()
        await self.ctl.start(timeout=2)
        await eventually(lambda: self.ctl.connected)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ctl.close()
        await self.fake.stop()

    def state(self, name) -> State:
        return self.catalog.get(name).state

    def posts(self) -> list[tuple[str, str]]:
        """(path, model) of every POST the fake saw, in order."""
        return [(p, q) for m, p, q in self.fake.requests if m == "POST"]


def three(**kw):
    return [FakeModel("alpha", **kw), FakeModel("beta", aliases=["b1"], **kw),
            FakeModel("gamma", **kw)]


def fake_loads(s: Stack) -> list[str]:
    return [name for name, n in s.fake.loads.items() for _ in range(n)]


def get_requests_autoload_free(s: Stack) -> bool:
    return all(q.get("autoload") == "false" for m, p, q in s.fake.requests if m == "GET")


# ---- start, names, scoping ---------------------------------------------------------------------------

@aio
async def test_start_reads_models_and_resolves_names(tmp_path):
    async with Stack(tmp_path, three()) as s:
        assert s.catalog.names() == ["alpha", "beta", "gamma"]
        assert s.ctl.resolve("b1") == "beta" and s.ctl.resolve("gamma:latest") == "gamma"
        with pytest.raises(ModelNotFound) as err:
            s.ctl.resolve("delta")
        assert err.value.status == 404 and err.value.code == "model_not_found"
        s.ctl.check_allowed(frozenset({"b1"}), "beta")
        with pytest.raises(ModelNotAllowed) as err:
            s.ctl.check_allowed(frozenset({"b1"}), "alpha")
        assert err.value.status == 403 and err.value.code == "model_not_allowed"
        assert s.fake.loads == {}           # reading never loads anything
        assert get_requests_autoload_free(s)


@aio
async def test_start_fails_when_the_router_never_answers(tmp_path):
    ctl = RouterController(RouterClient(str(tmp_path / "none.sock")), **FAST)
    t0 = time.monotonic()
    with pytest.raises(RouterError, match="did not answer"):
        await ctl.start(timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    await ctl.close()


def test_no_autoload_is_added_to_every_get_path():
    assert no_autoload("/models") == "/models?autoload=false"
    assert no_autoload("/props?model=a") == "/props?model=a&autoload=false"
    assert no_autoload("/props?model=a&autoload=false") == "/props?model=a&autoload=false"


@aio
async def test_a_probe_through_the_client_never_loads(tmp_path):
    async with Stack(tmp_path, three()) as s:
        status, body = await s.ctl.client.request("GET", "/props?model=alpha")
        assert status == 400 and b"not loaded" in body
        assert s.fake.loads == {} and s.state("alpha") is State.UNLOADED


# ---- loads on demand ----------------------------------------------------------------------------------

@aio
async def test_acquire_loads_once_for_concurrent_requests(tmp_path):
    async with Stack(tmp_path, three()) as s:
        leases = await asyncio.gather(*(s.ctl.acquire("alpha") for _ in range(5)))
        assert s.fake.loads == {"alpha": 1}
        assert s.catalog.get("alpha").in_flight == 5
        for lease in leases:
            lease.release()
            lease.release()                       # a second release is a no-op
        assert s.catalog.get("alpha").in_flight == 0
        with await s.ctl.acquire("alpha") as lease:     # loaded: no wait, no new load
            assert s.catalog.get("alpha").in_flight == 1
        assert lease.released and s.fake.loads == {"alpha": 1}


@aio
async def test_load_wait_deadline_gives_model_loading_and_the_load_goes_on(tmp_path):
    models = [FakeModel("alpha", load_time=0.6), FakeModel("beta")]
    async with Stack(tmp_path, models) as s:
        t0 = time.monotonic()
        with pytest.raises(ModelLoading) as err:
            await s.ctl.acquire("alpha", timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 1.5     # the deadline, not the 0.6 s load
        assert err.value.status == 503 and err.value.code == "model_loading"
        assert err.value.retry_after and err.value.retry_after > 0
        await eventually(lambda: s.state("alpha") is State.LOADED, timeout=3)
        lease = await s.ctl.acquire("alpha", timeout=0.1)     # loaded now: at once
        lease.release()
        assert s.fake.loads == {"alpha": 1}


@aio
async def test_a_router_load_past_load_timeout_is_a_failure(tmp_path):
    async with Stack(tmp_path, [FakeModel("slow", load_time=30)], load_timeout=0.3) as s:
        with pytest.raises(ModelFailed) as err:
            await s.ctl.acquire("slow", timeout=2)
        assert "not loaded within 0.3 s" in err.value.message
        assert s.fake.unloads == {"slow": 1}            # the stuck load was stopped
        assert s.state("slow") is State.FAILED


# ---- drain, then unload -------------------------------------------------------------------------------

@aio
async def test_unload_waits_for_in_flight_requests(tmp_path):
    async with Stack(tmp_path, three()) as s:
        lease = await s.ctl.acquire("alpha")
        unload = asyncio.ensure_future(s.ctl.unload("alpha"))
        await eventually(lambda: s.catalog.get("alpha").draining)
        # a new request for a draining model waits (it is not routed to it)...
        waiting = asyncio.ensure_future(s.ctl.acquire("alpha"))
        await asyncio.sleep(0.3)
        assert not unload.done() and not waiting.done()
        assert s.fake.unloads == {} and s.state("alpha") is State.LOADED
        assert s.catalog.public("alpha")["draining"] and s.catalog.get("alpha").in_flight == 1
        lease.release()                           # the stream ends: now it unloads
        await asyncio.wait_for(unload, 2)
        assert s.fake.unloads == {"alpha": 1}
        # ...and once it is unloaded, the waiting request loads it again
        again = await asyncio.wait_for(waiting, 2)
        assert s.fake.loads == {"alpha": 2} and s.state("alpha") is State.LOADED
        again.release()
        assert [p for p, _ in s.posts()] == ["/models/load", "/models/unload", "/models/load"]


@aio
async def test_unload_after_the_drain_deadline_anyway(tmp_path):
    async with Stack(tmp_path, three()) as s:
        lease = await s.ctl.acquire("alpha")
        t0 = time.monotonic()
        await s.ctl.unload("alpha", drain_timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 1.5
        assert s.fake.unloads == {"alpha": 1} and s.state("alpha") is State.UNLOADED
        lease.release()
        assert s.catalog.get("alpha").in_flight == 0


@aio
async def test_unload_of_an_unloaded_model_is_a_no_op(tmp_path):
    async with Stack(tmp_path, three()) as s:
        await s.ctl.unload("beta")
        assert s.fake.unloads == {}
        with pytest.raises(ModelNotFound):
            await s.ctl.unload("delta")


# ---- MODELS_MAX ----------------------------------------------------------------------------------------

@aio
async def test_switch_with_max_1_unloads_before_it_loads(tmp_path):
    async with Stack(tmp_path, three()) as s:
        (await s.ctl.acquire("alpha")).release()
        (await s.ctl.acquire(s.ctl.resolve("b1"))).release()     # beta, by its alias
        assert [p for p, _ in s.posts()] == ["/models/load", "/models/unload", "/models/load"]
        assert s.fake.evictions == []            # the router never had to evict by itself
        assert s.fake.max_running == 1
        assert s.state("alpha") is State.UNLOADED and s.state("beta") is State.LOADED


@aio
async def test_eviction_waits_for_the_busy_model_to_finish(tmp_path):
    async with Stack(tmp_path, three()) as s:
        alpha = await s.ctl.acquire("alpha")
        beta = asyncio.ensure_future(s.ctl.acquire("beta"))
        await eventually(lambda: s.catalog.get("alpha").draining)
        await asyncio.sleep(0.2)
        assert not beta.done() and s.fake.unloads == {}      # alpha is still streaming
        alpha.release()
        lease = await asyncio.wait_for(beta, 2)
        assert s.state("beta") is State.LOADED and s.fake.unloads == {"alpha": 1}
        assert s.fake.evictions == [] and s.fake.max_running == 1
        lease.release()


@aio
async def test_an_eviction_nobody_waits_for_any_more_is_abandoned(tmp_path):
    async with Stack(tmp_path, three()) as s:
        alpha = await s.ctl.acquire("alpha")
        with pytest.raises(ModelLoading):
            await s.ctl.acquire("beta", timeout=0.3)
        # beta's only request gave up: alpha serves again and was never unloaded
        await eventually(lambda: s.catalog.get("alpha").serving)
        assert s.fake.unloads == {} and s.fake.loads == {"alpha": 1}
        more = await s.ctl.acquire("alpha", timeout=0.2)
        more.release()
        alpha.release()


@aio
async def test_two_models_under_max_1_alternate_without_livelock(tmp_path):
    async with Stack(tmp_path, three()) as s:
        served = {"alpha": 0, "beta": 0}

        async def client(name):
            for _ in range(3):
                lease = await s.ctl.acquire(name, timeout=5)
                assert s.catalog.get(name).state is State.LOADED
                served[name] += 1
                await asyncio.sleep(0.02)
                lease.release()

        await asyncio.wait_for(asyncio.gather(*(client(n) for n in ("alpha", "beta") * 3)), 10)
        assert served == {"alpha": 9, "beta": 9}
        assert s.fake.max_running == 1 and s.fake.evictions == []


@aio
async def test_max_2_loads_side_by_side_and_evicts_the_idle_lru(tmp_path):
    async with Stack(tmp_path, three(), models_max=2) as s:
        a = await s.ctl.acquire("alpha")
        (await s.ctl.acquire("beta")).release()
        assert s.fake.unloads == {}
        (await s.ctl.acquire("gamma")).release()
        # alpha is busy, beta idle: beta goes, alpha stays
        assert s.fake.unloads == {"beta": 1}
        assert s.state("alpha") is State.LOADED and s.state("gamma") is State.LOADED
        a.release()
        assert s.fake.max_running == 2 and s.fake.evictions == []


@aio
async def test_admin_switch_order_follows_models_max(tmp_path):
    async with Stack(tmp_path, three()) as s:
        (await s.ctl.acquire("alpha")).release()
        await s.ctl.switch("beta")
        assert [p for p, _ in s.posts()] == ["/models/load", "/models/unload", "/models/load"]
        assert s.state("beta") is State.LOADED and s.state("alpha") is State.UNLOADED


@aio
async def test_admin_switch_loads_first_when_it_fits(tmp_path):
    async with Stack(tmp_path, three(), models_max=3) as s:
        (await s.ctl.acquire("alpha")).release()
        await s.ctl.switch("beta")
        kinds = [p for p, _ in s.posts()]
        assert kinds == ["/models/load", "/models/load", "/models/unload"]   # no gap
        assert s.state("beta") is State.LOADED and s.state("alpha") is State.UNLOADED


# ---- failures -----------------------------------------------------------------------------------------

@aio
async def test_failed_load_answers_model_failed_and_backs_off(tmp_path):
    models = three() + [FakeModel("broken", fail=True)]
    async with Stack(tmp_path, models, backoff=0.4) as s:
        with pytest.raises(ModelFailed) as err:
            await s.ctl.acquire("broken")
        assert err.value.code == "model_failed" and "failed to load" in err.value.message
        assert err.value.retry_after >= 1
        with pytest.raises(ModelFailed):                # within the back-off: no new try
            await s.ctl.acquire("broken")
        assert s.fake.loads == {"broken": 1}
        assert s.catalog.public("broken")["failure"]
        await asyncio.sleep(0.45)
        with pytest.raises(ModelFailed):                # after it: tried again
            await s.ctl.acquire("broken")
        assert s.fake.loads == {"broken": 2}


@aio
async def test_a_broken_model_does_not_evict_a_healthy_one_again_and_again(tmp_path):
    models = three() + [FakeModel("broken", fail=True)]
    async with Stack(tmp_path, models, backoff=0.1) as s:
        for attempt in range(4):
            (await s.ctl.acquire("alpha")).release()            # a healthy model in use
            with pytest.raises(ModelFailed) as err:
                await s.ctl.acquire("broken")
            await asyncio.sleep(0.1 * 2 ** attempt + 0.05)      # past the back-off
        # first try and one retry evicted alpha; after that, broken waits for free memory
        assert s.fake.loads["broken"] == 2
        assert s.fake.unloads["alpha"] == 2
        assert "loads again only when memory is free" in err.value.message
        assert s.state("alpha") is State.LOADED
        # an operator may still force it
        with pytest.raises(ModelFailed):
            await s.ctl.ensure_loaded("broken", force=True)
        assert s.fake.loads["broken"] == 3


@aio
async def test_admin_load_ignores_the_backoff(tmp_path):
    models = [FakeModel("alpha"), FakeModel("flaky", fail=True)]
    async with Stack(tmp_path, models, backoff=30) as s:
        with pytest.raises(ModelFailed):
            await s.ctl.acquire("flaky")
        s.fake.models["flaky"].fail = False           # the operator fixed the file
        with pytest.raises(ModelFailed):
            await s.ctl.acquire("flaky")              # requests still wait out the back-off
        await s.ctl.ensure_loaded("flaky", force=True)
        assert s.state("flaky") is State.LOADED and s.catalog.get("flaky").failures == 0


@aio
async def test_a_crash_seen_on_sse_marks_the_model_failed(tmp_path):
    async with Stack(tmp_path, three(), backoff=5) as s:
        (await s.ctl.acquire("alpha")).release()
        s.fake.crash("alpha")
        await eventually(lambda: s.state("alpha") is State.FAILED)
        with pytest.raises(ModelFailed) as err:
            await s.ctl.acquire("alpha")
        assert "exited with code 1" in err.value.message


@aio
async def test_router_limit_reached_is_retried(tmp_path):
    async with Stack(tmp_path, three()) as s:
        s.fake.status_override[("POST", "/models/load")] = (
            500, {"error": {"code": 500, "message": "model limit reached, try again later"}})
        task = asyncio.ensure_future(s.ctl.acquire("alpha"))
        await asyncio.sleep(0.3)
        assert not task.done()
        del s.fake.status_override[("POST", "/models/load")]
        (await asyncio.wait_for(task, 2)).release()
        assert s.state("alpha") is State.LOADED


@aio
async def test_router_refusing_a_load_is_a_failure(tmp_path):
    async with Stack(tmp_path, three()) as s:
        s.fake.status_override[("POST", "/models/load")] = (
            400, {"error": {"code": 400, "message": "something odd"}})
        with pytest.raises(ModelFailed) as err:
            await s.ctl.acquire("alpha")
        assert "refused to load it (400: something odd)" in err.value.message
        assert s.state("alpha") is State.FAILED


@aio
async def test_router_down_gives_model_loading_not_a_hang(tmp_path):
    async with Stack(tmp_path, three()) as s:
        await s.fake.stop()
        os.unlink(s.sock)
        t0 = time.monotonic()
        with pytest.raises(ModelLoading) as err:
            await s.ctl.acquire("alpha")
        assert "not answering" in err.value.message and time.monotonic() - t0 < 2
        s.fake = FakeRouter(three(), unix_path=s.sock)      # so __aexit__ has one to stop
        await s.fake.start()


# ---- following the router -----------------------------------------------------------------------------

@aio
async def test_silent_sse_still_works_by_polling(tmp_path):
    async with Stack(tmp_path, three()) as s:
        s.fake.silent = True                     # events lost: only /models tells
        (await s.ctl.acquire("alpha")).release()
        await s.ctl.switch("beta")
        assert s.state("beta") is State.LOADED and s.state("alpha") is State.UNLOADED


@aio
async def test_sse_gap_reconnects_and_rereads(tmp_path):
    async with Stack(tmp_path, three(), backoff=5) as s:
        (await s.ctl.acquire("alpha")).release()
        snapshots, connections = s.ctl.snapshots, s.fake.sse_connections
        s.fake.drop_sse()
        s.fake.silent = True                     # the crash below is not on any stream...
        s.fake.crash("alpha")
        s.fake.silent = False
        await eventually(lambda: s.fake.sse_connections > connections, timeout=3)
        await eventually(lambda: s.state("alpha") is State.FAILED, timeout=3)  # ...re-read
        assert s.ctl.snapshots > snapshots and s.ctl.connected


@aio
async def test_periodic_resync_catches_a_lost_event(tmp_path):
    async with Stack(tmp_path, three(), resync_interval=0.2) as s:
        (await s.ctl.acquire("alpha")).release()
        s.fake.silent = True
        s.fake.crash("alpha")
        await eventually(lambda: s.state("alpha") is State.FAILED, timeout=2)


@aio
async def test_a_cut_stream_triggers_a_reread(tmp_path):
    async with Stack(tmp_path, three(), resync_interval=60) as s:
        lease = await s.ctl.acquire("alpha")
        await asyncio.sleep(0.2)                  # the load's last re-read of /models is over
        s.fake.silent = True
        s.fake.crash("alpha")
        await asyncio.sleep(0.1)
        assert s.state("alpha") is State.LOADED          # nobody told the gateway yet
        lease.release(cut=True)
        await eventually(lambda: s.state("alpha") is State.FAILED, timeout=2)


@aio
async def test_cancelled_acquire_leaves_nothing_behind(tmp_path):
    async with Stack(tmp_path, [FakeModel("alpha", load_time=0.3), FakeModel("beta")]) as s:
        task = asyncio.ensure_future(s.ctl.acquire("alpha"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: s.state("alpha") is State.LOADED, timeout=2)
        assert s.catalog.get("alpha").in_flight == 0 and not s.ctl._waiters


# ---- admin events and preload ---------------------------------------------------------------------------

@aio
async def test_admin_events_snapshot_changes_and_heartbeat(tmp_path):
    async with Stack(tmp_path, three()) as s:
        stream = s.ctl.events(heartbeat=0.2)
        first = await anext(stream)
        assert first["type"] == "snapshot"
        assert [m["name"] for m in first["models"]] == ["alpha", "beta", "gamma"]
        states = []

        async def read():
            while "loaded" not in states:
                ev = await asyncio.wait_for(anext(stream), 2)
                if ev["type"] == "model" and ev["model"]["name"] == "alpha":
                    states.append(ev["model"]["state"])
        reader = asyncio.ensure_future(read())     # a reader keeping up sees each state
        lease = await s.ctl.acquire("alpha")
        await asyncio.wait_for(reader, 2)
        assert states[0] == "loading" and states[-1] == "loaded"
        lease.release()
        kinds = []
        t0 = time.monotonic()
        while "heartbeat" not in kinds:
            kinds.append((await asyncio.wait_for(anext(stream), 2))["type"])
        assert time.monotonic() - t0 < 2
        await stream.aclose()
        assert not s.ctl._subs
        shown = json.dumps(first)
        assert "/" not in shown                     # no paths, no command line


@aio
async def test_admin_events_are_scoped(tmp_path):
    async with Stack(tmp_path, three()) as s:
        stream = s.ctl.events(heartbeat=5, key_models=frozenset({"beta"}))
        first = await anext(stream)
        assert [m["name"] for m in first["models"]] == ["beta"]
        (await s.ctl.acquire("alpha")).release()
        (await s.ctl.acquire("beta")).release()
        ev = await asyncio.wait_for(anext(stream), 2)
        assert ev["model"]["name"] == "beta"
        await stream.aclose()


def test_format_sse():
    assert format_sse({"type": "heartbeat"}) == b": heartbeat\n\n"
    assert format_sse({"type": "model", "model": {"name": "a"}}) == \
        b'event: model\ndata: {"type":"model","model":{"name":"a"}}\n\n'


@aio
async def test_preload_and_health(tmp_path):
    models = three() + [FakeModel("broken", fail=True)]
    async with Stack(tmp_path, models, models_max=0) as s:
        assert s.ctl.health(["alpha", "beta"]) == "starting"
        result = await s.ctl.preload(["alpha", "beta"])
        assert result == {"alpha": None, "beta": None}
        assert s.ctl.health(["alpha", "beta"]) == "ready"
        result = await s.ctl.preload(["broken"])
        assert isinstance(result["broken"], ModelFailed)
        assert s.ctl.health(["alpha", "broken"]) == "failed"
