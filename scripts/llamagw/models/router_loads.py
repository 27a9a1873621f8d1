"""How RouterController waits for, grants, loads and unloads models (its scheduling half).

LoadScheduler is mixed into RouterController (models/router.py, whose docstring has the rules)
and is not used alone: it works on the state RouterController.__init__ sets (client, catalog,
models_max, load_timeout, drain_timeout, unload_timeout, poll_interval, _waiters, _attempts,
_loads, _unloading, _capacity, _change, _dirty, _servicing, _closed) and calls its resync().
Requests wait in a bounded queue per model (MAX_WAITERS_PER_MODEL) until their deadline. _service
grants every waiter in the step that sees the model loaded, fails them, or starts the one load
task of the model; a load first makes room under MODELS_MAX (draining and unloading an idle, then
the least recently used model) with the capacity lock held; an unload drains (no new requests;
in-flight ones until the drain deadline), asks the router, then waits for the instance to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging

from llamagw.models.catalog import CatalogError, State
from llamagw.models.router_client import RouterError, error_message
from llamagw.models.router_errors import (
    RETRY_AFTER_LOADING, ModelError, ModelFailed, ModelLoading, ModelNotFound,
)

log = logging.getLogger("gateway.models")

# Requests waiting for one model to load: the gateway's own queue bounds (MAX_QUEUE_SIZE) are
# far below this; it only stops a flood from growing memory without bound.
MAX_WAITERS_PER_MODEL = 1024

# After the router said "model limit reached" (its count and ours disagreed for a moment).
LIMIT_RETRY_DELAY = 0.2


@dataclasses.dataclass(eq=False)
class _Waiter:
    future: asyncio.Future
    lease: bool          # count it in flight when granted (a request), or not (admin/preload)
    force: bool          # an admin load: ignores the failure back-off and the eviction limit
    attempt: int         # load requests sent for the model before this waiter came


class LoadScheduler:
    """RouterController's waiting, granting, loading and unloading (see the module
    docstring for what it needs from the controller)."""

    # ---- waiting ----------------------------------------------------------------------------------
    def _bump(self) -> None:
        fut = self._change
        self._change = None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_change(self, deadline: float) -> None:
        """Until the next change or the deadline (returns either way)."""
        loop = asyncio.get_running_loop()
        if self._change is None or self._change.done():
            self._change = loop.create_future()
        left = deadline - loop.time()
        if left > 0:
            await asyncio.wait([self._change], timeout=left)

    async def _wait_until(self, predicate, deadline: float) -> bool:
        """Until predicate() holds (True) or the deadline (False), re-reading /models every
        poll_interval meanwhile: SSE events are hints, not guarantees."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.poll_interval
        while not predicate():
            now = loop.time()
            if now >= deadline:
                return False
            if now >= next_poll:
                with contextlib.suppress(RouterError, CatalogError):
                    await self.resync()
                next_poll = loop.time() + self.poll_interval
                continue
            await self._wait_change(min(deadline, next_poll))
        return True

    async def _wait_for(self, name: str, timeout: float, *, lease: bool, force: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        m = self.catalog.get(name)
        if not force and m.state is State.FAILED and self.catalog.backoff_left(name) > 0:
            raise self._failed_error(name)
        queue = self._waiters.setdefault(name, [])
        if len(queue) >= MAX_WAITERS_PER_MODEL:
            raise ModelLoading(f"model '{name}' is loading; too many requests wait for it",
                               retry_after=RETRY_AFTER_LOADING)
        waiter = _Waiter(loop.create_future(), lease, force, self._attempts.get(name, 0))
        queue.append(waiter)
        self._service_soon(name)
        fut = waiter.future
        try:
            await asyncio.wait([fut], timeout=deadline - loop.time())
        except BaseException:
            self._drop_waiter(name, waiter)
            if fut.done() and not fut.cancelled() and fut.exception() is None and lease:
                self.catalog.release(name)       # granted, but the caller went away
            raise
        if not fut.done():
            self._drop_waiter(name, waiter)
            fut.cancel()
            raise ModelLoading(f"model '{name}' is loading; try again shortly",
                               retry_after=RETRY_AFTER_LOADING)
        exc = fut.exception()
        if exc is not None:
            raise exc

    def _drop_waiter(self, name: str, waiter: _Waiter) -> None:
        queue = self._waiters.get(name)
        if queue and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiters[name]
            self._bump()          # a load task may be waiting for nobody now

    def _wanted(self, name: str) -> bool:
        return bool(self._waiters.get(name))

    def _forced(self, name: str) -> bool:
        return any(w.force for w in self._waiters.get(name, ()))

    def _failed_error(self, name: str) -> ModelFailed:
        m = self.catalog.get(name)
        left = self.catalog.backoff_left(name)
        reason = m.failure if m is not None and m.failure else "failed to load"
        return ModelFailed(f"model '{name}' {reason}",
                           retry_after=int(left + 0.999) if left > 0 else RETRY_AFTER_LOADING)

    def _fail_waiters(self, name: str, exc: ModelError) -> None:
        for waiter in self._waiters.pop(name, []):
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        self._bump()


    # ---- granting --------------------------------------------------------------------------------
    def _service_soon(self, name: str) -> None:
        self._dirty.add(name)
        self._process()

    def _process(self) -> None:
        if self._servicing:
            return                # the loop below picks the new names up
        self._servicing = True
        try:
            while self._dirty:
                self._service(self._dirty.pop())
        finally:
            self._servicing = False

    def _service(self, name: str) -> None:
        """Grant, fail or start a load for the requests waiting for `name`."""
        queue = self._waiters.get(name)
        if not queue or self._closed:
            return
        m = self.catalog.get(name)
        if m is None:
            self._fail_waiters(name, ModelNotFound(f"model '{name}' not found"))
            return
        if m.serving:
            del self._waiters[name]
            for waiter in queue:
                if not waiter.future.done():
                    if waiter.lease:
                        self.catalog.acquire(name)     # counted before anything else runs
                    waiter.future.set_result(None)
            return
        if m.draining or m.stopping or name in self._unloading:
            return                # it comes back once the unload is over
        if m.state is State.FAILED:
            # A request waits out the back-off; an admin load is failed by a load tried for it.
            attempts = self._attempts.get(name, 0)
            in_backoff = self.catalog.backoff_left(name) > 0
            failed = [w for w in queue
                      if (w.attempt < attempts if w.force else in_backoff)]
            if failed:
                error = self._failed_error(name)
                for waiter in failed:
                    queue.remove(waiter)
                    if not waiter.future.done():
                        waiter.future.set_exception(error)
                if not queue:
                    del self._waiters[name]
                    self._bump()
                    return
        if name not in self._loads and not self._closed:
            task = asyncio.get_running_loop().create_task(self._run_load(name))
            self._loads[name] = task

    # ---- loading ------------------------------------------------------------------------------------
    async def _run_load(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with self._capacity:
                m = self.catalog.get(name)
                if m is None or not self._wanted(name) or m.serving:
                    return
                if not m.occupies:
                    room = await self._make_room(name, loop.time() + self.load_timeout)
                    if not room:
                        return
                    await self._post_load(name)
            await self._await_loaded(name, loop.time() + self.load_timeout)
        except ModelError as exc:
            self._fail_waiters(name, exc)
        except RouterError as exc:
            log.warning("loading model %s: %s", name, exc)
            self._fail_waiters(name, ModelLoading(
                f"model '{name}' cannot be loaded now: llama-server's router is not answering",
                retry_after=RETRY_AFTER_LOADING))
        except asyncio.CancelledError:
            raise
        except Exception as exc:     # a bug must not leave requests waiting until their deadline
            log.exception("loading model %s", name)
            self._fail_waiters(name, ModelLoading(f"model '{name}' could not be loaded: {exc}",
                                                  retry_after=RETRY_AFTER_LOADING))
        finally:
            if self._loads.get(name) is asyncio.current_task():
                del self._loads[name]
            if not self._closed:
                self._service_soon(name)

    async def _make_room(self, name: str, deadline: float) -> bool:
        """Unload models until `name` fits in MODELS_MAX (the capacity lock is held).
        False when nobody wants `name` any more."""
        loop = asyncio.get_running_loop()
        while True:
            if self.models_max <= 0:
                return True
            occupied = self.catalog.occupied(exclude=name)
            if len(occupied) < self.models_max:
                return True
            if not self._wanted(name):
                return False
            if not self._forced(name) and not self.catalog.may_evict_for(name):
                m = self.catalog.get(name)
                raise ModelFailed(
                    f"model '{name}' failed {m.failures} times ({m.failure or 'failed to load'}); "
                    f"it loads again only when memory is free or by an admin load",
                    retry_after=max(RETRY_AFTER_LOADING,
                                    int(self.catalog.backoff_left(name) + 0.999)))
            candidates = [m for m in occupied
                          if m.state is State.LOADED and not m.draining and not m.stopping
                          and m.name not in self._unloading]
            if not candidates:       # all loading or already on their way out: wait
                if loop.time() >= deadline:
                    raise ModelLoading(f"model '{name}' waits for memory; try again shortly",
                                       retry_after=RETRY_AFTER_LOADING)
                await self._wait_change(min(deadline, loop.time() + self.poll_interval))
                continue
            victim = min(candidates, key=lambda m: (self._wanted(m.name), m.in_flight > 0,
                                                    m.last_used or 0.0, m.name))
            log.info("model %s: unloading %s to make room (MODELS_MAX=%d)", name, victim.name,
                     self.models_max)
            drain_deadline = min(loop.time() + self.drain_timeout, deadline)
            done = await self._drain_and_unload(victim.name, drain_deadline, for_model=name)
            if not done and not self._wanted(name):
                return False

    async def _post_load(self, name: str) -> None:
        """POST /models/load and mark it loading. A refusal is recorded as a failure in the
        catalog. ModelNotFound / RouterError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout
        body = json.dumps({"model": name}).encode()
        while True:
            self.catalog.mark_loading(name)
            self._attempts[name] = self._attempts.get(name, 0) + 1
            try:
                status, answer = await self.client.request("POST", "/models/load", body)
            except (RouterError, asyncio.CancelledError):
                self.catalog.settle(name, spawned=False)   # snapshots count again
                raise
            self.catalog.settle(name, spawned=status == 200)
            if status == 200:
                return
            message = error_message(answer)
            if status == 400 and "already running" in message:
                await self.resync()
                return
            if status == 404:
                await self.resync()
                raise ModelNotFound(f"model '{name}' not found")
            if status == 500 and "limit reached" in message and loop.time() < deadline:
                # the router counts an instance we think is gone (or not yet there): re-read
                await asyncio.sleep(LIMIT_RETRY_DELAY)
                await self.resync()
                continue
            # the waiters learn it from the catalog change (_service)
            self.catalog.record_failure(name, f"llama-server refused to load it ({status}: "
                                              f"{message})")
            return

    async def _await_loaded(self, name: str, deadline: float) -> None:
        """Until the load ends; its outcome is in the catalog (the waiters are served or
        failed from there by _service). A load past the deadline is stopped and recorded as
        a failure; so is an instance that went away without the gateway unloading it."""
        m = self.catalog.get(name)

        def settled() -> bool:
            return m.state is not State.LOADING
        if not await self._wait_until(settled, deadline):
            log.warning("model %s: not loaded within %.0f s; stopping it", name,
                        self.load_timeout)
            with contextlib.suppress(RouterError):
                await self.client.request("POST", "/models/unload",
                                          json.dumps({"model": name}).encode())
            self.catalog.record_failure(name, f"not loaded within {self.load_timeout:g} s")
        elif m.state is State.UNLOADED and name not in self._unloading:
            self.catalog.record_failure(name, "stopped before it was loaded")

    # ---- unloading ---------------------------------------------------------------------------------
    async def _unload_all(self, names: list[str], drain_deadline: float) -> None:
        results = await asyncio.gather(*(self._drain_and_unload(n, drain_deadline)
                                         for n in names), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _drain_and_unload(self, name: str, drain_deadline: float,
                                for_model: str = "") -> bool:
        """Drain (no new requests, wait for in-flight ones up to drain_deadline), then unload
        and wait for the exit. for_model: an eviction for that model, abandoned (False) when
        nobody wants that model any more before the unload starts."""
        m = self.catalog.get(name)
        if m is None:
            return True
        if name in self._unloading:     # someone else is unloading it: wait for that
            return await self._wait_until(lambda: name not in self._unloading,
                                          drain_deadline + self.unload_timeout)
        loop = asyncio.get_running_loop()
        self._unloading.add(name)
        self.catalog.set_draining(name, True)
        try:
            while m.in_flight > 0:
                if for_model and not self._wanted(for_model):
                    return False
                if loop.time() >= drain_deadline:
                    log.warning("model %s: unloading with %d request(s) still in flight after "
                                "the drain deadline", name, m.in_flight)
                    break
                await self._wait_change(drain_deadline)
            if for_model and not self._wanted(for_model):
                return False
            if not m.occupies:
                return True
            self.catalog.mark_stopping(name)
            try:
                status, answer = await self.client.request(
                    "POST", "/models/unload", json.dumps({"model": name}).encode())
            except RouterError:
                self.catalog.unmark_stopping(name)
                raise
            self.catalog.settle(name, spawned=False)
            if status != 200:
                message = error_message(answer)
                if status == 400 and "not running" in message:
                    await self.resync()
                    return True
                self.catalog.unmark_stopping(name)
                raise RouterError(f"unload of {name}: status {status}: {message}")
            if not await self._wait_until(lambda: not m.occupies,
                                          loop.time() + self.unload_timeout):
                raise RouterError(f"model {name} did not exit within {self.unload_timeout:g} s "
                                  f"of its unload")
            log.info("model %s unloaded", name)
            return True
        finally:
            self._unloading.discard(name)
            self.catalog.set_draining(name, False)
            self._service_soon(name)
