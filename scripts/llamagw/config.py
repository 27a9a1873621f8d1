"""One frozen Config, built once from the environment.

Every setting is a field of Config, written once: its default, the environment variable that sets
it and the check of that variable's value (`setting(...)`, the reason for the default in a comment
above it). load_config walks the fields; a bad value raises ConfigError naming the variable, and
the entry points turn that into exit code 2. A default that depends on the machine or on another
setting (DATA_DIR, AUTH_KEYS_FILE, MODEL_PATH) is a function of the settings read so far.

entrypoint.sh keeps no copy of these defaults: it asks print_supervisor_settings once for the
resolved values it needs (see there), so the supervisor, the health server and the gateway read
the same.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

DEFAULT_RUN_DIR = "/tmp/llama-gguf-inference"
# The kernel's sun_path holds 108 bytes with the terminating NUL.
UNIX_PATH_MAX = 107
# RunPod's payload limit: nothing larger reaches a worker or comes back from one.
PAYLOAD_LIMIT = 30_000_000

# Where DATA_DIR lands when unset: RunPod serverless mounts its network volume at /runpod-volume,
# RunPod pods at /workspace; elsewhere /data (the image's VOLUME).
DATA_DIR_CANDIDATES = ("/runpod-volume", "/workspace")
DATA_DIR_FALLBACK = "/data"

# logging's level names (not imported: the health server loads this module and must start fast).
LOG_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET")
# WORKER_TYPE names a log folder ($DATA_DIR/logs/llama-$WORKER_TYPE): one name, no separator.
WORKER_TYPE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ConfigError(ValueError):
    """A setting is invalid. str() names the variable."""

    def __init__(self, var: str, message: str):
        super().__init__(f"{var}: {message}")
        self.var = var


def default_data_dir(_values: Mapping[str, Any] | None = None) -> str:
    for candidate in DATA_DIR_CANDIDATES:
        if os.path.isdir(candidate):
            return candidate
    return DATA_DIR_FALLBACK


# ---- the checks: parse(var, raw) -> value, called only for a value that is not blank -----------
Parse = Callable[[str, str], Any]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def whole(lo: int, hi: int) -> Parse:
    def parse(var: str, raw: str) -> int:
        text = raw.strip()
        if not (text.isascii() and text.isdigit()):
            raise ConfigError(var, f"must be a whole number, got {raw!r}")
        value = int(text)
        if not lo <= value <= hi:
            raise ConfigError(var, f"must be between {lo} and {hi}, got {value}")
        return value
    return parse


port_number = whole(1, 65535)


def seconds(lo: float = 0.001, hi: float = 86_400.0) -> Parse:
    def parse(var: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(var, f"must be a number of seconds, got {raw!r}") from None
        if not (lo <= value <= hi):  # also rejects nan
            raise ConfigError(var, f"must be between {lo:g} and {hi:g} seconds, "
                                   f"got {raw.strip()}")
        return value
    return parse


def boolean(var: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(var, f"must be true or false, got {raw!r}")


def stripped(_var: str, raw: str) -> str:
    return raw.strip()


def origin_list(var: str, raw: str) -> tuple[str, ...]:
    out = []
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        if origin != "*" and not (origin.startswith("http://") or origin.startswith("https://")):
            raise ConfigError(var, f"each origin must be '*' or start with http:// or https://, "
                                   f"got {item.strip()!r}")
        out.append(origin)
    return tuple(out)


def socket_path(var: str, raw: str) -> str:
    path = raw.strip()
    if not os.path.isabs(path) or "\0" in path:
        raise ConfigError(var, f"must be an absolute path, got {path!r}")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ConfigError(var, f"a Unix socket path holds at most {UNIX_PATH_MAX} bytes, "
                               f"got {len(os.fsencode(path))}")
    return path


def level_name(var: str, raw: str) -> str:
    level = raw.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(var, f"must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return level


def folder_name(var: str, raw: str) -> str:
    name = raw.strip()
    if not WORKER_TYPE_RE.fullmatch(name):
        raise ConfigError(var, f"must be 1-64 letters, digits, '.', '_' or '-', got {raw!r}")
    return name


def one_of(*choices: str) -> Parse:
    def parse(var: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(var, f"must be one of {', '.join(choices)}, got {raw!r}")
        return value
    return parse
def name_list(_var: str, raw: str) -> tuple[str, ...]:
    """Comma-separated items, stripped; blanks skipped, duplicates dropped (model names: the
    router's catalog checks them, entrypoint.sh resolves files and paths to names first)."""
    return tuple(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))


def setting(env: str, default: Any, parse: Parse = stripped,
            derive: Callable[[Mapping[str, Any]], Any] | None = None) -> Any:
    """A Config field set by the environment variable `env`. Unset or blank: `default`, or
    derive(values so far) when the default depends on the machine or on another setting."""
    return dataclasses.field(default=default,
                             metadata={"env": env, "parse": parse, "derive": derive})


def _keys_file(values: Mapping[str, Any]) -> str:
    return os.path.join(values["data_dir"], "api_keys.txt")


def _usage_journal_mode(values: Mapping[str, Any]) -> str:
    return "delete" if values["data_dir"] == DATA_DIR_CANDIDATES[0] else "wal"


def _model_path(values: Mapping[str, Any]) -> str:
    name = values["model_name"]
    return os.path.join(values["data_dir"], "models", name) if name else ""


@dataclasses.dataclass(frozen=True)
class Config:
    # ---- network
    # RunPod load-balancing endpoint conventions.
    port: int = setting("PORT", 8000, port_number)
    port_health: int = setting("PORT_HEALTH", 8001, port_number)
    host: str = setting("HOST", "0.0.0.0")
    backend_host: str = setting("BACKEND_HOST", "127.0.0.1")
    # llama-server's historical default port, always passed explicitly.
    port_backend: int = setting("PORT_BACKEND", 8080, port_number)
    # Empty: TCP to BACKEND_HOST:PORT_BACKEND. llama-server's Unix socket, which entrypoint.sh
    # sets by default (BACKEND_TRANSPORT=unix, $RUN_DIR/llama-server.sock).
    backend_socket: str = setting("BACKEND_SOCKET", "", socket_path)
    # ---- places
    data_dir: str = setting("DATA_DIR", DATA_DIR_FALLBACK, derive=default_data_dir)
    run_dir: str = setting("RUN_DIR", DEFAULT_RUN_DIR)
    # ---- request limits
    max_request_body_size: int = setting("MAX_REQUEST_BODY_SIZE", PAYLOAD_LIMIT,
                                         whole(1, 1 << 34))
    # Idle sockets cost little; this bounds the descriptors a flood can take.
    max_connections: int = setting("MAX_CONNECTIONS", 10_240, whole(1, 1_000_000))
    # ---- deadlines (seconds)
    # A real client sends its head in one packet; slowloris does not.
    client_header_timeout: float = setting("CLIENT_HEADER_TIMEOUT", 10.0, seconds())
    # Total time for the request body (30 MB at ~1 MB/s).
    client_body_timeout: float = setting("CLIENT_BODY_TIMEOUT", 30.0, seconds())
    # No body byte for this long means the client is gone.
    client_body_idle_timeout: float = setting("CLIENT_BODY_IDLE_TIMEOUT", 10.0, seconds())
    # Longer than common client pool idle times causes races less often than a short one; idle
    # sockets cost little and are capped by MAX_CONNECTIONS.
    keepalive_timeout: float = setting("KEEPALIVE_TIMEOUT", 30.0, seconds())
    # A client that reads nothing of a response for this long is dropped.
    client_write_timeout: float = setting("CLIENT_WRITE_TIMEOUT", 30.0, seconds())
    # llama-server is on loopback; a connect that takes longer is broken.
    backend_connect_timeout: float = setting("BACKEND_CONNECT_TIMEOUT", 5.0, seconds())
    # First response byte from llama-server (prompt processing of a long context on a slow GPU),
    # below RunPod's 5.5 min per request.
    request_timeout: float = setting("REQUEST_TIMEOUT", 300.0, seconds())
    # No byte from llama-server mid-response for this long: as long as the first byte may take.
    stream_idle_timeout: float = setting("STREAM_IDLE_TIMEOUT", 300.0, seconds())
    # Drain time on SIGTERM; RunPod/docker send SIGKILL after their own grace.
    graceful_timeout: float = setting("GRACEFUL_TIMEOUT", 30.0, seconds(lo=0.0))
    # ---- identity and limits
    auth_enabled: bool = setting("AUTH_ENABLED", True, boolean)
    auth_keys_file: str = setting("AUTH_KEYS_FILE", "", derive=_keys_file)
    max_requests_per_minute: int = setting("MAX_REQUESTS_PER_MINUTE", 120, whole(1, 10_000_000))
    max_concurrent_requests_per_key: int = setting("MAX_CONCURRENT_REQUESTS_PER_KEY", 4,
                                                   whole(1, 1_000_000))
    max_concurrent_requests: int = setting("MAX_CONCURRENT_REQUESTS", 8, whole(1, 1_000_000))
    max_queue_size: int = setting("MAX_QUEUE_SIZE", 64, whole(0, 1_000_000))
    queue_timeout: float = setting("QUEUE_TIMEOUT", 30.0, seconds())
    metrics_key: str = setting("METRICS_KEY", "")
    cors_origins: tuple[str, ...] = setting("CORS_ORIGINS", (), origin_list)
    # ---- observability
    log_level: str = setting("LOG_LEVEL", "INFO", level_name)
    access_log_max_bytes: int = setting("ACCESS_LOG_MAX_BYTES", 50_000_000, whole(4096, 1 << 40))
    access_log_backups: int = setting("ACCESS_LOG_BACKUPS", 5, whole(0, 1000))
    # ---- usage ledger and token limits (observe/usage.py, limits/budget.py)
    # One row per finished keyed request in $DATA_DIR/usage/<host>.sqlite: what /admin/usage,
    # `keys.py usage` and the day's token budget after a restart read. Off: nothing is written
    # (token limits still apply, counted in memory from this start).
    usage_enabled: bool = setting("USAGE_ENABLED", True, boolean)
    # Rows older than this are deleted (once a day): a quarter covers a monthly bill and its
    # disputes; a row is ~150 bytes, so a worker at a steady 1 request/s keeps ~1 GB.
    usage_retention_days: int = setting("USAGE_RETENTION_DAYS", 90, whole(1, 36_500))
    # SQLite journal of the ledger. wal: appends, readers never block the writer; but WAL needs
    # memory shared by the writer and its readers, which a network volume read by workers on
    # other hosts does not give. So on RunPod serverless's network volume (DATA_DIR
    # /runpod-volume, every worker reading every worker's file) the default is delete.
    usage_journal_mode: str = setting("USAGE_JOURNAL_MODE", "", one_of("wal", "delete"),
                                      derive=_usage_journal_mode)
    # ---- model (the gateway describes it on the Ollama API: /api/tags, /api/show)
    model_name: str = setting("MODEL_NAME", "")
    model_path: str = setting("MODEL_PATH", "", derive=_model_path)
    # Set by entrypoint.sh when it starts the gateway while a MODEL_URL download brings
    # MODEL_PATH: the gateway reads the file's header once it is there, not at start.
    model_downloading: bool = setting("MODEL_DOWNLOADING", False, boolean)
    worker_type: str = setting("WORKER_TYPE", "instruct", folder_name)
    # ---- many models (router mode: llama-server's router over MODELS_DIR; entrypoint.sh
    # generates its preset and exports these; models/serving.py reads them)
    # Set: llama-server runs as a router over this folder and the gateway resolves, scopes,
    # loads and unloads models itself. Empty: one model, as before.
    models_dir: str = setting("MODELS_DIR", "")
    # Models in memory at once (llama-server's --models-max; 0: no limit). One is the safe
    # default for a single GPU: a second model would not fit next to the first.
    models_max: int = setting("MODELS_MAX", 1, whole(0, 1024))
    # The models loaded at boot (entrypoint.sh waits for them before health 200); the gateway
    # reports them in /health. It never loads them itself: after a switch, a restarted gateway
    # must not evict the model in use.
    models_preload: tuple[str, ...] = setting("MODELS_PRELOAD", (), name_list)
    # The model of a request that names none ("" : such a request is refused, 400).
    # entrypoint.sh sets it from MODEL_NAME / MODEL_PATH.
    models_default: str = setting("MODELS_DEFAULT", "")
    # The preset llama-server's router reads (entrypoint.sh generates it): a pulled model gets its
    # section there, a deleted one loses it (models/pulls.py).
    models_preset_file: str = setting("MODELS_PRESET_FILE", "")
    # Where hf:// and hf.co/ pulls are resolved (HF_TOKEN is read from the environment at the
    # pull, never kept in the config).
    hf_endpoint: str = setting("HF_ENDPOINT", "https://huggingface.co")
    # How long a request waits for its model to load before 503 model_loading + Retry-After
    # (the load goes on). A small model loads in under a second, a 70B one from a network
    # volume in minutes; 120 s covers most loads within one client's patience, and is below
    # RunPod's 5.5 min per request.
    model_load_wait: float = setting("MODEL_LOAD_WAIT", 120.0, seconds(lo=0.0))

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.data_dir, "logs")

    @property
    def access_log_path(self) -> str:
        return os.path.join(self.logs_dir, "api_access.log")

    @property
    def usage_dir(self) -> str:
        """Every worker's usage ledger file: $DATA_DIR/usage/<host>.sqlite."""
        return os.path.join(self.data_dir, "usage")

    @property
    def health_file(self) -> str:
        return os.path.join(self.run_dir, "health")


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from env (default os.environ). Raises ConfigError."""
    if env is None:
        env = os.environ
    fields = dataclasses.fields(Config)
    values: dict[str, Any] = {}
    derived = []
    for f in fields:
        var = f.metadata["env"]
        raw = env.get(var, "")
        if raw.strip():
            values[f.name] = f.metadata["parse"](var, raw)
        elif f.metadata["derive"] is not None:
            derived.append(f)
        else:
            values[f.name] = f.default
    for f in derived:           # in field order: a derived default may use an earlier one
        values[f.name] = f.metadata["derive"](values)
    cfg = Config(**values)
    if cfg.port == cfg.port_health:
        raise ConfigError("PORT_HEALTH", f"must differ from PORT ({cfg.port})")
    return cfg


# ---- what entrypoint.sh asks ---------------------------------------------------------------------
# llama-server's socket under RUN_DIR when BACKEND_TRANSPORT=unix and BACKEND_SOCKET is unset.
BACKEND_SOCKET_NAME = "llama-server.sock"


def supervisor_settings(env: Mapping[str, str], transport: str) -> dict[str, str]:
    """The resolved settings entrypoint.sh needs, as NAME -> text, all of Config checked first.

    `transport` is entrypoint.sh's BACKEND_TRANSPORT (how it starts llama-server): `unix` gives
    BACKEND_SOCKET (the one set, else $RUN_DIR/llama-server.sock, checked as a Unix socket
    path), `tcp` an empty one. The three ports must differ: the supervisor listens on all three
    on this machine. Raises ConfigError."""
    if transport == "tcp":      # llama-server on PORT_BACKEND: a BACKEND_SOCKET set is not used
        env = {name: value for name, value in env.items() if name != "BACKEND_SOCKET"}
    cfg = load_config(env)
    if transport == "tcp":
        backend_socket = ""
    else:
        backend_socket = cfg.backend_socket or socket_path(
            "BACKEND_SOCKET", os.path.join(cfg.run_dir, BACKEND_SOCKET_NAME))
    if len({cfg.port, cfg.port_health, cfg.port_backend}) < 3:
        raise ConfigError("PORT_BACKEND", f"PORT ({cfg.port}), PORT_HEALTH ({cfg.port_health}) "
                                          f"and PORT_BACKEND ({cfg.port_backend}) must differ")
    out = {
        "DATA_DIR": cfg.data_dir, "RUN_DIR": cfg.run_dir, "LOGS_DIR": cfg.logs_dir,
        "HEALTH_FILE": cfg.health_file, "HOST": cfg.host, "PORT": str(cfg.port),
        "PORT_HEALTH": str(cfg.port_health), "PORT_BACKEND": str(cfg.port_backend),
        "BACKEND_SOCKET": backend_socket, "WORKER_TYPE": cfg.worker_type,
        "GRACEFUL_TIMEOUT": repr(cfg.graceful_timeout),
        "GRACEFUL_TIMEOUT_MS": str(round(cfg.graceful_timeout * 1000)),
    }
    for name, value in out.items():     # one NAME=value line each
        if "\n" in value or "\r" in value:
            raise ConfigError(name, f"must not hold a line break, got {value!r}")
    return out


def print_supervisor_settings(argv: list[str]) -> int:
    """entrypoint.sh's one call: argv is [BACKEND_TRANSPORT]. Prints NAME=value lines and
    returns 0, or one `error=MESSAGE` line (the message names the variable) and returns 2."""
    try:
        settings = supervisor_settings(os.environ, argv[0])
    except ConfigError as exc:
        print(f"error={exc}")
        return 2
    sys.stdout.write("".join(f"{name}={value}\n" for name, value in settings.items()))
    return 0
