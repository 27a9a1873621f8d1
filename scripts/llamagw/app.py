"""The gateway: config from the environment, wire the parts, serve, shut down in order.

    python3 scripts/gateway.py        (PORT, BACKEND_HOST, PORT_BACKEND, ... see config.py)

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 2 for a configuration error (the message
names the variable), 1 if it cannot listen.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time

from llamagw import config as config_mod
from llamagw import errors
from llamagw.admin.plane import AdminPlane
from llamagw.api import cors, routes
from llamagw.backend_state import TAKES_REQUESTS, BackendState, State
from llamagw.errors import GatewayError
from llamagw.limits import admission, budget, fairqueue, keys, ratelimit
from llamagw.models import describe, serving
from llamagw.net import fastio, upstream
from llamagw.net.connection import ClientConnection
from llamagw.observe import accesslog, usage
from llamagw.observe import metrics as metrics_mod

log = logging.getLogger("gateway")

# Listen backlog: bursts of new connections (load tests, many clients at once) queue here.
LISTEN_BACKLOG = 2048
# The cyclic garbage collector. asyncio's socket transports were each a reference cycle (one keeps
# a bound method of itself), so each connection left garbage only the collector frees, and with
# CPython's default gen-0 threshold of 700 allocations it ran about every 20 connections: 290
# collections per 3,000 streams of bench case (c), about 50 us of CPU per stream. At 10,000,
# with the start-up objects frozen, they were 15x rarer and took 40 % of the time in all (159 ->
# 67 ms per 3,000 streams, measured). fastio's transports drop their protocol when the
# connection is lost, so a connection is now freed by reference counting (200 streams left none
# of the gateway's objects to the collector); the threshold still spaces out the collections
# that every request's allocations would trigger.
GC_GEN0_THRESHOLD = 10_000
# Key file poll period; keys.KeyStore itself stats at most every 2 s.
KEY_POLL_INTERVAL = 1.0
# Usage ledger at SIGTERM: the writer's last pass writes what is pending (a few batches of a
# few ms each); 5 s leaves the rest of docker's / RunPod's grace to llama-server's own stop.
USAGE_CLOSE_TIMEOUT = 5.0
# At start the token budgets are seeded from this worker's ledger (today's rows, by key): an
# indexed read of one file, milliseconds; past this (a stalled network volume) the gateway starts
# with budgets counted from zero rather than not at all.
USAGE_SEED_TIMEOUT = 10.0
# The routes whose requests the ledger records: those that take an inference key (a row per
# keyed request; admin and open routes are not usage).
USAGE_ROUTES = frozenset(r.name for r in routes.ROUTES.values() if r.auth is admission.Auth.KEY)


def backend_unavailable(state: str) -> GatewayError | None:
    """The 503 for a backend state that takes no requests, or None (ready, unknown)."""
    if state in (State.STARTING, State.STOPPING):
        return GatewayError(503, f"The model backend is {state}; retry shortly",
                            "backend_" + state,
                            headers=[("retry-after", str(errors.RETRY_AFTER_STARTING))])
    if state == State.FAILED:
        return GatewayError(503, "The model backend has failed", "backend_failed",
                            headers=[("retry-after", str(errors.RETRY_AFTER_FAILED))])
    return None


class Gateway:
    lingering_refusals = 0          # _Refuse connections in their lingering close

    def __init__(self, config: config_mod.Config, *, store: keys.KeyStore | None = None,
                 access_log: accesslog.AccessLog | None = None,
                 ledger: usage.Ledger | None = None, router=None):
        """router: a models.router.RouterController to use in router mode (tests); by default
        one is made from the config when MODELS_DIR is set."""
        self.config = config
        self.started = time.monotonic()
        self.connections: set[ClientConnection] = set()
        self.shutting_down = False
        self.in_flight = 0
        self.metrics = metrics_mod.Metrics()
        self.store = store
        self.access_log = access_log
        self.ledger = ledger        # the usage ledger (issue 28); None: not recorded
        self.admission = admission.Admission(config, store, self.metrics)
        self.cors = cors.Cors(config.cors_origins)
        self.backend = BackendState(config.health_file)
        self.pool = upstream.UpstreamPool(config.backend_host, config.port_backend,
                                          config.backend_connect_timeout,
                                          unix_path=config.backend_socket)
        # The Host header of upstream requests (llama-server ignores it; HTTP/1.1 requires one).
        self.backend_hostport = ("localhost" if config.backend_socket
                                 else f"{config.backend_host}:{config.port_backend}")
        self.listeners: list[fastio.Listener] = []
        # The served models, described from their GGUF headers for the Ollama API.
        self.catalog = describe.ModelCatalog(config.model_path, config.model_name,
                                             models_dir=config.models_dir)
        # ---- models (issue 27): names, key scoping, loads, per-model slots ----
        self.models = serving.ModelService(self, controller=router)
        self.router_mode = self.models.router
        self.model_name = self.models.single_name or None   # single-model mode's model
        self.metrics.set_model_source(self.models.states)
        # ---- end of models ----
        self.metrics.set_gauge_sources(
            queue_depth=lambda: self.admission.slots.waiting + self.models.waiting(),
            backend_up=lambda: 1 if self.backend.get() in TAKES_REQUESTS else 0,
            keys_loaded=lambda: len(self.store) if self.store is not None else 0,
        )
        self.metrics.set_counter_sources(
            usage_rows_dropped=lambda: self.ledger.dropped if self.ledger is not None else 0)
        self.metrics.in_flight = 0
        if store is not None and config.auth_enabled:
            self.metrics.set_known_keys(store.key_ids())
        # --- the dashboard and the admin API (issue 29): admin/plane.py ---
        self.admin = AdminPlane(config, self)
        self._live_hub = self.admin.hub           # observe() tests it for every request
        self._live_request = self.admin.feed.on_request
        # Router mode: the dashboard's Models view follows the catalog (the snapshot of GET
        # /admin/models, published on every state change; the ticker also notices within 1 s).
        # Single-model mode keeps the feed's own snapshot (the backend state's one model).
        if self.router_mode:
            self.admin.feed.models_source = self.models.snapshot
            self.models.controller.catalog.listeners.append(
                lambda _names: self.admin.feed.models_changed())
        # --- end of issue 29's block ---

    def reload_keys(self, now: float | None = None) -> bool:
        """Re-read the key file (now=None: at once, e.g. SIGHUP; else a poll that stats the file
        at most every few seconds). On a change, per-key state of removed keys is dropped."""
        store = self.store
        if store is None:
            return False
        changed = store.reload() if now is None else store.maybe_reload(now)
        if changed:
            self._keys_changed()
        return changed

    def _keys_changed(self) -> None:
        ids = self.store.key_ids()
        self.admission.rate.retain(ids)
        self.admission.budget.retain(ids)
        if self.config.auth_enabled:
            self.metrics.set_known_keys(ids)
        self.admission.admin.keys_changed()       # sessions of revoked/rotated/demoted keys

    async def reload_keys_now(self) -> bool:
        """Re-read the key file now, in a worker thread (after an edit by the admin API)."""
        store = self.store
        if store is None:
            return False
        changed = await asyncio.to_thread(store.reload)
        if changed:
            self._keys_changed()
        return changed

    def new_slots(self) -> fairqueue.FairBackendSlots:
        """The one factory of backend slots: the concurrency and queue to llama-server of one
        model (router mode: one per model, models/serving.py), shared fairly between keys."""
        return fairqueue.FairBackendSlots(self.config.max_concurrent_requests,
                                          self.config.max_queue_size, errors=ratelimit)

    # ---------------- request services (context.Services: the request code's view) ----------
    def try_backend_slot(self, ctx, model: str | None = None):
        """The backend check and a free slot (the model's own in router mode) without waiting,
        the key's turn shared fairly with other keys'; None when the caller must wait in the
        queue (backend_slot). Raises GatewayError (503) like backend_slot."""
        self._check_backend()
        try:
            return self.admission.try_backend_slot(
                ctx.key_id, self.models.slots_for(model) if self.router_mode else None)
        except ratelimit.SlotsClosed:
            raise backend_unavailable(State.STOPPING) from None

    async def backend_slot(self, ctx):
        """Wait in the queue (the model's, ctx.model, in router mode). At shutdown every waiter
        is answered backend_stopping at once."""
        self._check_backend()
        self.metrics.in_flight = self.in_flight
        try:
            return await self.admission.backend_slot(
                ctx, self.models.slots_for(ctx.model) if self.router_mode else None)
        except ratelimit.SlotsClosed:
            raise backend_unavailable(State.STOPPING) from None

    def _check_backend(self) -> None:
        """503 unless the backend takes requests (BackendState.serving: a refusal is made from
        the file as it is now; a refused connection re-reads it too: unreachable())."""
        state = self.backend.serving()
        if state in TAKES_REQUESTS:
            return
        err = backend_unavailable(state)
        if err is not None:
            raise err

    def unreachable(self, exc: OSError) -> GatewayError:
        """The error for a connect to llama-server that failed (relay.forward).

        A refused connection (ECONNREFUSED; ENOENT for a missing Unix socket file) is what a
        dead llama-server answers, before the supervisor has noticed, or within the state
        file's TTL of the `starting` it wrote: the state file is read at once and answered from. A
        supervised llama-server that refuses while the file still says `ready` is dead and
        about to be restarted (the supervisor restarts every dead one, or writes `failed`):
        503 backend_starting with its Retry-After, as a moment later, since nothing reached
        llama-server and a retry is safe. Without a supervisor (no state file) nobody restarts
        it: 502 upstream_unavailable, and no Retry-After to promise."""
        state = self.backend.refresh()
        err = backend_unavailable(state)
        if err is None and state == State.READY and isinstance(
                exc, (ConnectionRefusedError, FileNotFoundError)):
            err = backend_unavailable(State.STARTING)
        if err is None:
            err = GatewayError(502, "llama-server is not reachable", "upstream_unavailable")
        return err

    def observe(self, ctx) -> None:
        ttfb = ctx.ttfb
        self.metrics.observe_request(ctx.route, ctx.status, ctx.key_id, ctx.duration, ttfb)
        if ctx.model is not None:
            self.metrics.observe_model(ctx.model, ctx.status)
        if ctx.upstream_error:
            # Once per request, whenever llama-server failed it: an error answered before the
            # head (PendingRequest.fail) or an answer cut after it (relay.Exchange).
            self.metrics.inc_upstream_error(ctx.upstream_error)
        # ---- usage (issue 28): the ledger row, the key's token budget, the tokens metric ----
        key_id = ctx.key_id
        if key_id != "-" and ctx.route in USAGE_ROUTES:
            prompt = ctx.prompt_tokens
            completion = ctx.completion_tokens
            # The model: as router mode resolved it (ctx.model), else as llama-server answered.
            model = ctx.model or ctx.answered_model
            if model is not None and len(model) > usage.MAX_MODEL_CHARS:
                model = model[:usage.MAX_MODEL_CHARS]
            if self.ledger is not None:
                self.ledger.record((time.time(), ctx.request_id, key_id, model, ctx.route,
                                    ctx.status, ctx.outcome, prompt, completion,
                                    ctx.cached_tokens, ctx.duration * 1000.0,
                                    None if ttfb is None else ttfb * 1000.0, ctx.bytes_in,
                                    ctx.bytes_out))
            if prompt is not None or completion is not None:
                self.metrics.add_tokens(key_id, prompt or 0, completion or 0, model)
                self.admission.charge(key_id, (prompt or 0) + (completion or 0))
        if self.access_log is not None:
            self.access_log.request(ctx)
        if self._live_hub.active:                 # a dashboard listens (issue 29)
            self._live_request(ctx)               # a deque append: the feed takes it later

    async def seed_token_budget(self) -> None:
        """Today's tokens per key from this worker's own ledger file, read in a thread (the
        token budget is per worker, so its own file; `USAGE_SEED_TIMEOUT`). Before serving."""
        if self.ledger is None:
            return
        path = self.ledger.path
        tokens = self.admission.budget
        now = tokens.clock()
        try:
            day, minute = await asyncio.wait_for(asyncio.to_thread(
                _read_token_seed, path, tokens.day_start(now), now), USAGE_SEED_TIMEOUT)
        except TimeoutError:
            log.warning("usage: reading today's tokens from %s took over %.0f s; token budgets "
                        "count from now", path, USAGE_SEED_TIMEOUT)
            return
        tokens.seed(day, minute, at=now)
        if day:
            log.info("usage: token budgets seeded from %s: %d key(s) used tokens today",
                     path, len(day))

    def observe_protocol_error(self, peer: str, err: GatewayError) -> None:
        self.metrics.observe_request("-", err.status, "-", 0.0, None)
        if self.access_log is not None:
            self.access_log.write({"time": time.time(), "client": peer, "status": err.status,
                                   "outcome": err.code})

    # ---------------- life cycle ----------------
    def new_connection(self) -> asyncio.Protocol:
        if len(self.connections) >= self.config.max_connections:
            return _Refuse(self)
        return ClientConnection(self)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on `sock` (bound) or on HOST:PORT: every address HOST resolves to (as asyncio's
        create_server binds), SO_REUSEADDR so a restart rebinds at once."""
        loop = asyncio.get_running_loop()
        socks = [sock] if sock is not None else _bind(self.config.host, self.config.port)
        self.listeners = [fastio.Listener(loop, s, self.new_connection, LISTEN_BACKLOG)
                          for s in socks]
        self.models.start()       # router mode: connects to llama-server's router meanwhile
        self.admin.start()                        # the gateway's log records for the dashboard

    @property
    def port(self) -> int:
        return self.listeners[0].sockets[0].getsockname()[1]

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting; close idle connections; let busy ones finish with keep-alive off, up to
        GRACEFUL_TIMEOUT; then cancel the rest."""
        if timeout is None:
            timeout = self.config.graceful_timeout
        self.shutting_down = True
        self.admin.close_streams()        # live dashboards first: their connections can close
        self.admission.slots.close()      # queued requests: 503 backend_stopping at once
        for listener in self.listeners:
            listener.close()
        # The models' queues and load waits end too (503 at once), admin event streams end;
        # streams in flight drain below and release their leases into the closed controller.
        await self.models.close()
        for conn in list(self.connections):
            conn.keep_alive = False
            conn.wake_if_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.cancel()
        tasks = [c.task for c in list(self.connections) if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self.catalog.close()
        self.pool.close()
        await self.admin.close()


# Over MAX_CONNECTIONS the 503 is written at once, without reading the request; the connection
# is then closed in stages (RFC 9112 9.6): write side shut, and what the client sends is read and
# dropped until its end-of-stream, REFUSE_LINGER_MAX_BYTES or REFUSE_LINGER_TIMEOUT, whichever
# comes first. Closed at once, the request bytes still unread made the kernel send a reset, which
# mostly reached the client before it had read the 503 (38 of 40 tries). The client has the 503
# and the end-of-stream within one round trip; 1 s covers any client, and keeps each refused
# connection's descriptor for a short time only.
REFUSE_LINGER_TIMEOUT = 1.0
# A request head and a small body; a client that keeps sending is not reading the answer anyway.
REFUSE_LINGER_MAX_BYTES = 65536
# Refused connections lingering at once: a flood over MAX_CONNECTIONS holds at most this many
# descriptors more. Past it a refusal closes at once (its client may see a reset instead).
MAX_LINGERING_REFUSALS = 256
_REFUSAL_BODY = (b'{"error":{"message":"Too many connections","type":"service_unavailable",'
                 b'"code":"too_many_connections"}}')
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: %d\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
            % (errors.RETRY_AFTER_CONNECTIONS, len(_REFUSAL_BODY)) + _REFUSAL_BODY)


class _Refuse(asyncio.Protocol):
    """Over MAX_CONNECTIONS: answer 503 without reading the request, then a lingering close
    (see REFUSE_LINGER_TIMEOUT)."""

    __slots__ = ("gw", "transport", "timer", "dropped", "counted")

    def __init__(self, gw: "Gateway"):
        self.gw = gw
        self.transport = None
        self.timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        self.counted = False

    def connection_made(self, transport):
        self.transport = transport
        transport.write(_REFUSAL)
        sock = transport.get_extra_info("socket")
        if (self.gw.lingering_refusals >= MAX_LINGERING_REFUSALS or sock is None
                or transport.get_write_buffer_size()):
            transport.close()       # (a 503 not sent whole goes out first, then the close)
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            transport.close()
            return
        self.gw.lingering_refusals += 1
        self.counted = True
        self.timer = asyncio.get_running_loop().call_later(REFUSE_LINGER_TIMEOUT,
                                                           transport.close)

    def data_received(self, data):
        self.dropped += len(data)
        if self.dropped > REFUSE_LINGER_MAX_BYTES:
            self.transport.close()

    def eof_received(self):
        return False                # the client is done: close now

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            self.gw.lingering_refusals -= 1


def _bind(host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _name, addr in dict.fromkeys(infos):
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)   # v4 binds apart
            s.bind(addr)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _read_token_seed(path: str, day_start: float, now: float) -> tuple[dict, dict]:
    """({key_id: tokens today}, {key_id: tokens in the last minute}) from one ledger file."""
    if not os.path.isfile(path):
        return {}, {}
    return (usage.tokens_since(path, day_start),
            usage.tokens_since(path, now - budget.WINDOW_S))


def tune_gc() -> None:
    """Once started: what exists now (modules, config, keys) lives as long as the process, so
    it is frozen out of every later collection, and gen-0 collections run less often."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _poll_keys(store: keys.KeyStore, gw: Gateway, optional: bool = False) -> None:
    """optional (AUTH_ENABLED=false: the file holds only the admin keys, if any): a missing
    file is not an error to report."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(KEY_POLL_INTERVAL)
        try:
            if optional and not os.path.exists(store.path):
                continue
            gw.reload_keys(loop.time())
        except Exception:
            log.exception("key file poll failed")


async def amain(cfg: config_mod.Config) -> int:
    store = None
    if cfg.auth_enabled:
        store = keys.KeyStore(cfg.auth_keys_file, logger=log)
        if os.path.exists(cfg.auth_keys_file):
            store.load()       # KeyFileError -> exit 2 (bad line, unsafe permissions)
            log.info("loaded %d API key(s) from %s", len(store), cfg.auth_keys_file)
        else:
            log.error("no key file at %s: every API request will get 401 until it exists "
                      "(create one with: python3 scripts/keys.py add NAME)", cfg.auth_keys_file)
    else:
        log.warning("!!! AUTH_ENABLED=false: the API is open to anyone who can reach port %d !!!",
                    cfg.port)
        # The admin API needs an admin key whatever AUTH_ENABLED says: the key file is still
        # read (and polled) for its admin keys.
        store = keys.KeyStore(cfg.auth_keys_file, logger=log)
        if os.path.exists(cfg.auth_keys_file):
            store.load()
    os.makedirs(cfg.logs_dir, exist_ok=True)
    access = accesslog.AccessLog(cfg.access_log_path, max_bytes=cfg.access_log_max_bytes,
                                 backups=cfg.access_log_backups)
    ledger = None
    if cfg.usage_enabled:       # the writer thread creates the folder and opens the file
        ledger = usage.Ledger(usage.usage_path(cfg.data_dir),
                              retention_days=cfg.usage_retention_days,
                              journal_mode=cfg.usage_journal_mode)
        log.info("usage ledger: %s (kept %d days)", ledger.path, cfg.usage_retention_days)
    gw = Gateway(cfg, store=store, access_log=access, ledger=ledger)
    await gw.seed_token_budget()
    try:
        await gw.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc)
        access.close()
        if ledger is not None:
            await asyncio.to_thread(ledger.close, USAGE_CLOSE_TIMEOUT)
        return 1
    log.info("gateway listening on %s:%d, backend %s%s", cfg.host, cfg.port, gw.pool.address,
             f" (router mode over {cfg.models_dir}, MODELS_MAX={cfg.models_max})"
             if gw.router_mode else "")
    tune_gc()
    # The models' GGUF headers (and digest) for the Ollama API, read off the event loop.
    catalog_task = asyncio.create_task(gw.catalog.load(downloading=cfg.model_downloading))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gw.reload_keys)
    poller = asyncio.create_task(_poll_keys(store, gw, optional=not cfg.auth_enabled))
    gw.admin.follow_files()       # llama-server's and the boot log, for the dashboard
    log.info("dashboard: http://%s:%d/ui/ (sign in with an admin key%s)", cfg.host or "0.0.0.0",
             cfg.port, "" if gw.admission.admin.admin_keys() else
             "; there is none yet: python3 scripts/keys.py add NAME --role admin")
    await stop.wait()
    log.info("shutting down: draining %d connection(s) for up to %.0f s",
             len(gw.connections), cfg.graceful_timeout)
    poller.cancel()
    catalog_task.cancel()
    await gw.shutdown()
    if ledger is not None:
        # Every request is accounted now: the rows still pending are written before exit.
        if not await asyncio.to_thread(ledger.close, USAGE_CLOSE_TIMEOUT):
            log.error("usage ledger: %d row(s) not written at exit", ledger.pending)
        log.info("usage ledger closed: %d row(s) written, %d dropped", ledger.written,
                 ledger.dropped)
    access.close()
    log.info("gateway stopped")
    return 0


def main() -> int:
    try:
        cfg = config_mod.load_config()
    except config_mod.ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        return asyncio.run(amain(cfg))
    except keys.KeyFileError as exc:
        print(f"gateway: key file error: {exc}", file=sys.stderr)
        return 2
