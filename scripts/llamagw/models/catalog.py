"""The gateway's own catalog of the models llama-server's router serves.

Fed by the router's `GET /models` (a snapshot: at start, after every reconnect, on any gap) and
its `/models/sse` events (hints in between); see /work/shared/ROUTER-MODE.md §2. Pure and
synchronous (no I/O, no asyncio): router.py does the talking and the waiting, and tests drive this
directly with an injected clock.

What it adds to the router's view:
  - names: case-sensitive resolution of a name or alias to the canonical name (a trailing
    ":latest", which Ollama clients add, is ignored: names never hold ':');
  - states: loaded | loading | unloaded | failed. llama-server has no "failed" state: a model
    whose instance exited with a non-zero code shows `unloaded` + `failed: true` (snapshot) or
    `unloaded` + `exit_code` (event). The router's `sleeping` is `loaded` here (the process is
    alive, holds its memory and wakes on the next request); `router_state` keeps the raw value;
  - failures: a failure starts a back-off (FAILURE_BACKOFF_INITIAL doubling to
    FAILURE_BACKOFF_MAX per consecutive failure) during which requests do not load the model again:
    each try respawns it and, with MODELS_MAX reached, evicts a healthy model first. An exit the
    gateway caused (it asked for the unload: `stopping`) is not a failure;
  - gateway state per model: in-flight requests, last use, draining (no new requests: an unload
    or an eviction is waiting for the in-flight ones to end);
  - nothing public holds llama-server's `status.args` / `status.preset` (absolute paths of the
    binary and the files, the command line): they are never even stored.

Stale information is ignored, not applied: an SSE `status_change` that was emitted before the
gateway's own `POST /models/load` (it can still sit unread in the SSE socket) would report the
previous life of the model; after a load request, events for that model count again only from
the router's spawn event (`model_status`), and snapshots only when requested after the load
request was answered (epochs: `tick()`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from typing import Callable, Iterable

from llamagw.models.preset import check_name

# --- limits and timings ---------------------------------------------------------------------------
# First back-off after a failure: a broken file does not fix itself in seconds, and every retry
# respawns the model (evicting a healthy one when MODELS_MAX is reached); a crash from a
# transient cause (an OOM under a burst) is retried soon enough.
FAILURE_BACKOFF_INITIAL = 10.0
# Back-off cap: a model that keeps failing is retried at most every 5 minutes.
FAILURE_BACKOFF_MAX = 300.0
# Consecutive failures after which a model may no longer evict another one to load (it loads
# only into free room, or by an admin load/switch): a broken model evicts a healthy one at most
# on its first try and its first retry, never again and again.
EVICT_AFTER_FAILURES_MAX = 1
# Largest /models body accepted: an entry is ~1-3 KB (its args and preset included), so 256
# models (preset.MAX_MODELS) fit in well under 1 MiB.
MAX_MODELS_BODY = 8 << 20
# Models kept from a router answer: preset.MAX_MODELS with room for a few extra entries.
MAX_CATALOG_MODELS = 1024
# Longest failure reason kept (it comes from llama-server's error text).
MAX_REASON_LEN = 300

# Router sources not listed: models llama-server found in the Hugging Face cache (LLAMA_CACHE,
# HF_HOME...) were never validated by preset.py and have no section in the generated preset.
EXCLUDED_SOURCES = ("cache",)


class State(str, enum.Enum):
    LOADED = "loaded"
    LOADING = "loading"
    UNLOADED = "unloaded"
    FAILED = "failed"


# llama-server status.value -> gateway state (before the failed flag is applied).
_ROUTER_STATES = {
    "loaded": State.LOADED,
    "sleeping": State.LOADED,
    "loading": State.LOADING,
    "downloading": State.LOADING,
    "unloaded": State.UNLOADED,
    "downloaded": State.UNLOADED,
}

# Fields of the child's /v1/models "meta" that the gateway shows (the rest stays out).
_META_FIELDS = ("size", "n_ctx", "n_ctx_train", "n_params", "ftype")
# Model.action_epoch while our POST /models/load is unanswered: later than any snapshot's epoch.
# A GET /models sent meanwhile may be answered before the router takes the load: its "unloaded"
# made the load look "stopped before it was loaded" (a failure and its back-off: 3 of 60 first
# loads of the e2e router under CPU load, 0 of 60 since). Snapshots count again from the answer
# on (settle()).
_LOAD_UNANSWERED = 1 << 62


class CatalogError(ValueError):
    """A router answer that is not the expected shape."""


@dataclasses.dataclass(eq=False)
class Model:
    name: str
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    state: State = State.UNLOADED
    router_state: str = "unloaded"
    exit_code: int = 0
    progress: float | None = None       # 0..1 while loading, when llama-server says
    failure: str = ""                   # why it failed (kept until it loads again)
    failures: int = 0                   # consecutive failures
    failed_until: float = 0.0           # clock(): no autoload before this
    meta: dict = dataclasses.field(default_factory=dict)
    in_flight: int = 0
    last_used: float | None = None      # wall clock of the last request's end (or start)
    draining: bool = False              # no new requests: waiting for in-flight ones to end
    stopping: bool = False              # the gateway asked the router to unload it
    awaiting_spawn: bool = False        # after our POST /models/load: see the module doc
    action_epoch: int = 0               # tick() when our last load/unload request was answered
    before_load: tuple | None = None    # (state, router_state) before mark_loading
    source: str = ""
    input_modalities: tuple[str, ...] = ("text",)

    @property
    def occupies(self) -> bool:
        """Counts against MODELS_MAX (llama-server counts every running instance)."""
        return self.state in (State.LOADED, State.LOADING)

    @property
    def serving(self) -> bool:
        """New requests may be sent to it now."""
        return self.state is State.LOADED and not self.draining and not self.stopping

    def names(self) -> tuple[str, ...]:
        return (self.name,) + self.aliases


class Catalog:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 backoff_initial: float = FAILURE_BACKOFF_INITIAL,
                 backoff_max: float = FAILURE_BACKOFF_MAX,
                 exclude_sources: Iterable[str] = EXCLUDED_SOURCES):
        self.clock = clock
        self.wall = wall
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.exclude_sources = frozenset(exclude_sources)
        self._models: dict[str, Model] = {}
        self._aliases: dict[str, str] = {}
        self._epoch = 0
        self.synced = False                  # at least one snapshot applied
        self.listeners: list[Callable[[set[str]], None]] = []

    # ---- reading --------------------------------------------------------------------------------
    def resolve(self, requested) -> str | None:
        """The canonical name for a model name or alias (case-sensitive), or None."""
        if not isinstance(requested, str) or not requested:
            return None
        if requested.endswith(":latest"):
            requested = requested[:-len(":latest")]
        if requested in self._models:
            return requested
        return self._aliases.get(requested)

    def get(self, name: str) -> Model | None:
        return self._models.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def models(self) -> list[Model]:
        return [self._models[n] for n in sorted(self._models)]

    def names(self) -> list[str]:
        return sorted(self._models)

    def allowed(self, key_models: frozenset[str] | None, name: str) -> bool:
        """May a key limited to key_models (None: no limit) use model `name`? The key's list
        may name a model by its name or an alias."""
        if key_models is None:
            return True
        canonical = self.resolve(name)
        if canonical is None:
            return False
        model = self._models[canonical]
        return any(n in key_models for n in model.names())

    def visible(self, key_models: frozenset[str] | None = None) -> list[Model]:
        """What /v1/models and /api/tags list for that key."""
        return [m for m in self.models() if self.allowed(key_models, m.name)]

    def loaded(self, key_models: frozenset[str] | None = None) -> list[Model]:
        """What /api/ps lists: loaded models the key may use."""
        return [m for m in self.visible(key_models) if m.state is State.LOADED]

    def occupied(self, exclude: str = "") -> list[Model]:
        return [m for m in self.models() if m.occupies and m.name != exclude]

    def backoff_left(self, name: str) -> float:
        m = self._models.get(name)
        if m is None or m.state is not State.FAILED:
            return 0.0
        return max(0.0, m.failed_until - self.clock())

    def may_evict_for(self, name: str) -> bool:
        m = self._models.get(name)
        return m is not None and m.failures <= EVICT_AFTER_FAILURES_MAX

    def health(self, preload: Iterable[str]) -> str:
        """starting | ready | failed for the platform probe: ready once every preload model is
        loaded, failed as soon as one of them failed."""
        if not self.synced:
            return "starting"
        states = [self._models[n].state if n in self._models else None for n in preload]
        if any(s in (State.FAILED, None) for s in states):
            return "failed"
        if all(s is State.LOADED for s in states):
            return "ready"
        return "starting"

    def public(self, name: str) -> dict:
        """A model as the admin API and /admin/events show it: no paths, no command line."""
        m = self._models[name]
        meta = m.meta
        left = self.backoff_left(name)
        return {
            "name": m.name,
            "aliases": list(m.aliases),
            "state": m.state.value,
            "router_state": m.router_state,
            "draining": m.draining or m.stopping,
            "in_flight": m.in_flight,
            "last_used": round(m.last_used, 3) if m.last_used is not None else None,
            "size": meta.get("size"),
            "quantization": meta.get("ftype"),
            "context": meta.get("n_ctx"),
            "context_train": meta.get("n_ctx_train"),
            "parameters": meta.get("n_params"),
            "progress": m.progress if m.state is State.LOADING else None,
            "failure": m.failure or None,
            "retry_after": int(left + 0.999) if left > 0 else None,
            "input_modalities": list(m.input_modalities),
        }

    def snapshot(self, key_models: frozenset[str] | None = None) -> list[dict]:
        return [self.public(m.name) for m in self.visible(key_models)]

    # ---- epochs ------------------------------------------------------------------------------------
    def tick(self) -> int:
        """A new epoch: take one before requesting a snapshot, and pass it to replace()."""
        self._epoch += 1
        return self._epoch

    # ---- router input ----------------------------------------------------------------------------
    def replace(self, payload, *, epoch: int | None = None) -> set[str]:
        """Apply a GET /models answer (bytes, str or the parsed JSON). Models that are gone are
        dropped (unless requests are in flight on them: they stay until released). Returns the
        names that changed. epoch: tick() taken before the request was sent; models with a
        load/unload request newer than that keep their state."""
        data = _parse(payload)
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise CatalogError("router /models answer without a data list")
        seen: dict[str, dict] = {}
        for entry in entries[:MAX_CATALOG_MODELS]:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            if entry.get("source") in self.exclude_sources:
                continue
            if check_name(entry["id"], "model name") is not None:
                continue      # not a name the gateway can serve (never one preset.py wrote)
            seen[entry["id"]] = entry
        changed: set[str] = set()
        for name in list(self._models):
            if name not in seen and self._models[name].in_flight == 0:
                del self._models[name]
                changed.add(name)
        for name, entry in seen.items():
            m = self._models.get(name)
            if m is None:
                m = self._models[name] = Model(name)
                changed.add(name)
            before = self._signature(m)
            aliases = entry.get("aliases")
            m.aliases = tuple(sorted(a for a in aliases if isinstance(a, str) and a != name
                                     and check_name(a, "alias") is None)) \
                if isinstance(aliases, list) else ()
            tags = entry.get("tags")
            m.tags = tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else ()
            m.source = str(entry.get("source") or "")
            arch = entry.get("architecture")
            if isinstance(arch, dict) and isinstance(arch.get("input_modalities"), list):
                m.input_modalities = tuple(x for x in arch["input_modalities"]
                                           if isinstance(x, str))
            self._take_meta(m, entry.get("meta"))
            status = entry.get("status")
            if isinstance(status, dict) and (epoch is None or epoch > m.action_epoch):
                m.awaiting_spawn = False
                raw = status.get("value")
                exit_code = status.get("exit_code") if isinstance(status.get("exit_code"),
                                                                  int) else 0
                failed = bool(status.get("failed")) or exit_code != 0
                self._transition(m, raw, exit_code, failed)
            if self._signature(m) != before:
                changed.add(name)
        self._rebuild_aliases()
        self.synced = True
        self._notify(changed)
        return changed

    def apply_event(self, event) -> set[str] | None:
        """Apply one /models/sse event. Returns the changed names, or None when a fresh snapshot
        is needed (an event about a model not in the catalog, a reload, a removal)."""
        if not isinstance(event, dict):
            return None
        kind = event.get("event")
        name = event.get("model")
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if kind in ("download_progress", "download_finished", "download_failed"):
            return set()
        if kind not in ("model_status", "status_change") or not isinstance(name, str):
            return None                       # models_reload, model_remove, unknown: re-read
        m = self._models.get(name)
        if m is None:
            return None
        if kind == "status_change" and m.awaiting_spawn:
            return set()                      # from the life before our load request
        if kind == "model_status":
            m.awaiting_spawn = False
        before = self._signature(m)
        raw = data.get("status")
        exit_code = data.get("exit_code") if isinstance(data.get("exit_code"), int) else 0
        info = data.get("info")
        if isinstance(info, dict):
            self._take_meta(m, info.get("meta"))
        progress = data.get("progress")
        if isinstance(progress, dict) and isinstance(progress.get("value"), (int, float)):
            m.progress = float(progress["value"])
        self._transition(m, raw, exit_code, exit_code != 0)
        changed = {name} if self._signature(m) != before else set()
        self._notify(changed)
        return changed

    # ---- the gateway's own actions ----------------------------------------------------------------
    def mark_loading(self, name: str) -> None:
        """Before POST /models/load: count it as loading now (it occupies a slot), and ignore
        events from its previous life until the router's spawn event."""
        m = self._models[name]
        m.awaiting_spawn = True
        m.action_epoch = _LOAD_UNANSWERED      # until settle()
        m.progress = None
        if m.state is not State.LOADED:
            m.before_load = (m.state, m.router_state)
            m.state = State.LOADING
            m.router_state = "loading"
        self._notify({name})

    def mark_stopping(self, name: str) -> None:
        """Before POST /models/unload: its exit is the gateway's doing, not a failure."""
        m = self._models[name]
        m.stopping = True
        m.action_epoch = self.tick()
        self._notify({name})

    def settle(self, name: str, *, spawned: bool = True) -> None:
        """After the router answered a load/unload request: snapshots requested from now on
        are newer than it. spawned=False: the load request was refused (nothing spawned)."""
        m = self._models.get(name)
        if m is None:
            return
        m.action_epoch = self.tick()
        if not spawned:
            m.awaiting_spawn = False
            if m.before_load is not None and m.state is State.LOADING:
                m.state, m.router_state = m.before_load
                self._notify({name})
        m.before_load = None

    def unmark_stopping(self, name: str) -> None:
        """The unload request did not go through: the model serves again."""
        m = self._models.get(name)
        if m is not None and m.stopping:
            m.stopping = False
            self._notify({name})

    def set_draining(self, name: str, draining: bool) -> None:
        m = self._models.get(name)
        if m is not None and m.draining != draining:
            m.draining = draining
            self._notify({name})

    def record_failure(self, name: str, reason: str) -> None:
        """A failure the gateway saw itself (a refused load, a load past its deadline)."""
        m = self._models.get(name)
        if m is None:
            return
        self._fail(m, reason)
        self._notify({name})

    def acquire(self, name: str) -> None:
        m = self._models[name]
        m.in_flight += 1
        m.last_used = self.wall()
        self._notify({name})

    def release(self, name: str) -> None:
        m = self._models.get(name)
        if m is None:
            return
        m.in_flight = max(0, m.in_flight - 1)
        m.last_used = self.wall()
        self._notify({name})

    def update_meta(self, name: str, **fields) -> None:
        """Fill what the router does not say before a first load (e.g. size and quantization
        from the GGUF header): fields of _META_FIELDS."""
        m = self._models.get(name)
        if m is None:
            return
        for key, value in fields.items():
            if key in _META_FIELDS and key not in m.meta:
                m.meta[key] = value
        self._notify({name})

    # ---- internals -------------------------------------------------------------------------------
    def _transition(self, m: Model, raw, exit_code: int, failed: bool) -> None:
        if not isinstance(raw, str) or raw not in _ROUTER_STATES:
            return
        new = _ROUTER_STATES[raw]
        m.router_state = raw
        if new is State.UNLOADED:
            m.progress = None
            if failed and not m.stopping:
                if m.state is not State.FAILED:
                    was = m.state
                    if was is State.LOADING:
                        reason = f"failed to load (llama-server's instance exited with code " \
                                 f"{exit_code or 1})"
                    elif was is State.LOADED:
                        reason = f"llama-server's instance exited with code {exit_code or 1}"
                    else:        # first seen failed: a load or a crash before we looked
                        reason = f"llama-server's instance exited with code {exit_code or 1}"
                    m.exit_code = exit_code
                    self._fail(m, reason)
                return
            m.stopping = False
            m.exit_code = exit_code
            if m.state is not State.FAILED or not failed:
                m.state = State.UNLOADED
            return
        if new is State.LOADED:
            m.failures = 0
            m.failure = ""
            m.failed_until = 0.0
            m.progress = None
        m.state = new

    def _fail(self, m: Model, reason: str) -> None:
        m.failures += 1
        delay = min(self.backoff_max, self.backoff_initial * 2 ** (m.failures - 1))
        m.failed_until = self.clock() + delay
        m.failure = reason[:MAX_REASON_LEN]
        m.state = State.FAILED
        m.stopping = False
        m.progress = None

    @staticmethod
    def _take_meta(m: Model, meta) -> None:
        if isinstance(meta, dict):
            for key in _META_FIELDS:
                value = meta.get(key)
                if isinstance(value, (int, str)) and not isinstance(value, bool):
                    m.meta[key] = value

    @staticmethod
    def _signature(m: Model) -> tuple:
        return (m.state, m.router_state, m.aliases, m.failure, m.progress,
                tuple(sorted(m.meta.items())), m.input_modalities)

    def _rebuild_aliases(self) -> None:
        aliases: dict[str, str] = {}
        for m in self.models():
            for alias in m.aliases:
                if alias not in self._models and alias not in aliases:
                    aliases[alias] = m.name
        self._aliases = aliases

    def _notify(self, changed: set[str]) -> None:
        if changed:
            for fn in list(self.listeners):
                fn(changed)


def _parse(payload):
    if isinstance(payload, (bytes, bytearray)):
        if len(payload) > MAX_MODELS_BODY:
            raise CatalogError(f"router /models answer larger than {MAX_MODELS_BODY} bytes")
        payload = bytes(payload).decode("utf-8", "replace")
    if isinstance(payload, str):
        try:
            return json.loads(payload)
        except ValueError as exc:
            raise CatalogError(f"router /models answer is not JSON: {exc}") from None
    return payload


def parse_key_models(value: str) -> frozenset[str]:
    """A key's `models=a,b` setting -> the names (or aliases) it may use. ValueError if bad."""
    names = [part.strip() for part in value.split(",")]
    for name in names:
        why = check_name(name, "a model name in models=")
        if why:
            raise ValueError(why)
    return frozenset(names)
