"""One frozen Config, built once from the environment.

Every setting has a name (the environment variable), a default and a check. A bad value raises
ConfigError naming the variable; the entry points turn that into exit code 2.

Defaults, and where the numbers come from:
- PORT 8000 / PORT_HEALTH 8001: RunPod load-balancing endpoint conventions.
- PORT_BACKEND 8080: llama-server's historical default port, always passed explicitly.
- BACKEND_SOCKET (empty: TCP to BACKEND_HOST:PORT_BACKEND): llama-server's Unix socket, which
  entrypoint.sh sets by default (BACKEND_TRANSPORT=unix, $RUN_DIR/llama-server.sock). At most
  UNIX_PATH_MAX bytes: the kernel's sun_path holds 108 with the terminating NUL.
- MAX_REQUEST_BODY_SIZE 30 MB: RunPod's payload limit; nothing larger can reach a worker anyway.
- CLIENT_HEADER_TIMEOUT 10 s: a real client sends its head in one packet; slowloris does not.
- CLIENT_BODY_TIMEOUT 30 s: total time for the request body (30 MB at ~1 MB/s).
- CLIENT_BODY_IDLE_TIMEOUT 10 s: no body byte for this long means the client is gone.
- KEEPALIVE_TIMEOUT 30 s: longer than common client pool idle times would cause races less often
  than a short one; idle sockets cost little and are capped by MAX_CONNECTIONS.
- CLIENT_WRITE_TIMEOUT 30 s: a client that reads nothing of a response for this long is dropped.
- BACKEND_CONNECT_TIMEOUT 5 s: llama-server is on loopback; a connect that takes longer is broken.
- REQUEST_TIMEOUT 300 s: first response byte from llama-server (prompt processing of a long
  context on a slow GPU), below RunPod's 5.5 min per request.
- GRACEFUL_TIMEOUT 30 s: drain time on SIGTERM; RunPod/docker send SIGKILL after their own grace.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

DEFAULT_RUN_DIR = "/tmp/llama-gguf-inference"
UNIX_PATH_MAX = 107

# Where DATA_DIR lands when unset: RunPod serverless mounts its network volume at /runpod-volume,
# RunPod pods at /workspace; elsewhere /data (the image's VOLUME).
DATA_DIR_CANDIDATES = ("/runpod-volume", "/workspace")
DATA_DIR_FALLBACK = "/data"


class ConfigError(ValueError):
    """A setting is invalid. str() names the variable."""

    def __init__(self, var: str, message: str):
        super().__init__(f"{var}: {message}")
        self.var = var


def default_data_dir() -> str:
    for candidate in DATA_DIR_CANDIDATES:
        if os.path.isdir(candidate):
            return candidate
    return DATA_DIR_FALLBACK


@dataclasses.dataclass(frozen=True)
class Config:
    # network
    port: int = 8000
    port_health: int = 8001
    host: str = "0.0.0.0"
    backend_host: str = "127.0.0.1"
    port_backend: int = 8080
    backend_socket: str = ""
    # places
    data_dir: str = DATA_DIR_FALLBACK
    run_dir: str = DEFAULT_RUN_DIR
    # request limits
    max_request_body_size: int = 30_000_000
    max_connections: int = 10_240
    # deadlines (seconds)
    client_header_timeout: float = 10.0
    client_body_timeout: float = 30.0
    client_body_idle_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    client_write_timeout: float = 30.0
    backend_connect_timeout: float = 5.0
    request_timeout: float = 300.0
    stream_idle_timeout: float = 300.0
    graceful_timeout: float = 30.0
    # identity and limits (issue 3)
    auth_enabled: bool = True
    auth_keys_file: str = ""
    max_requests_per_minute: int = 120
    max_concurrent_requests_per_key: int = 4
    max_concurrent_requests: int = 8
    max_queue_size: int = 64
    queue_timeout: float = 30.0
    metrics_key: str = ""
    cors_origins: tuple[str, ...] = ()
    access_log_max_bytes: int = 50_000_000
    access_log_backups: int = 5
    # model (the gateway describes it on the Ollama API: /api/tags, /api/show)
    model_path: str = ""
    model_name: str = ""
    worker_type: str = "instruct"

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.data_dir, "logs")

    @property
    def access_log_path(self) -> str:
        return os.path.join(self.logs_dir, "api_access.log")

    @property
    def health_file(self) -> str:
        return os.path.join(self.run_dir, "health")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _int(env: Mapping[str, str], var: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(var, f"must be a whole number, got {raw!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise ConfigError(var, f"must be between {lo} and {hi}, got {value}")
    return value


def _seconds(env: Mapping[str, str], var: str, default: float, lo: float = 0.001,
             hi: float = 86_400.0) -> float:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(var, f"must be a number of seconds, got {raw!r}") from None
    if not (lo <= value <= hi):  # also rejects nan
        raise ConfigError(var, f"must be between {lo:g} and {hi:g} seconds, got {raw.strip()}")
    return value


def _bool(env: Mapping[str, str], var: str, default: bool) -> bool:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(var, f"must be true or false, got {raw!r}")


def _port(env: Mapping[str, str], var: str, default: int) -> int:
    return _int(env, var, default, 1, 65535)


def _origins(env: Mapping[str, str], var: str) -> tuple[str, ...]:
    raw = env.get(var, "").strip()
    if not raw:
        return ()
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


def _unix_path(env: Mapping[str, str], var: str) -> str:
    raw = env.get(var, "").strip()
    if not raw:
        return ""
    if not os.path.isabs(raw) or "\0" in raw:
        raise ConfigError(var, f"must be an absolute path, got {raw!r}")
    if len(os.fsencode(raw)) > UNIX_PATH_MAX:
        raise ConfigError(var, f"a Unix socket path holds at most {UNIX_PATH_MAX} bytes, "
                               f"got {len(os.fsencode(raw))}")
    return raw


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from env (default os.environ). Raises ConfigError."""
    if env is None:
        env = os.environ
    data_dir = env.get("DATA_DIR", "").strip() or default_data_dir()
    run_dir = env.get("RUN_DIR", "").strip() or DEFAULT_RUN_DIR
    keys_file = env.get("AUTH_KEYS_FILE", "").strip() or os.path.join(data_dir, "api_keys.txt")
    cfg = Config(
        port=_port(env, "PORT", 8000),
        port_health=_port(env, "PORT_HEALTH", 8001),
        host=env.get("HOST", "").strip() or "0.0.0.0",
        backend_host=env.get("BACKEND_HOST", "").strip() or "127.0.0.1",
        port_backend=_port(env, "PORT_BACKEND", 8080),
        backend_socket=_unix_path(env, "BACKEND_SOCKET"),
        data_dir=data_dir,
        run_dir=run_dir,
        max_request_body_size=_int(env, "MAX_REQUEST_BODY_SIZE", 30_000_000, 1, 1 << 34),
        max_connections=_int(env, "MAX_CONNECTIONS", 10_240, 1, 1_000_000),
        client_header_timeout=_seconds(env, "CLIENT_HEADER_TIMEOUT", 10.0),
        client_body_timeout=_seconds(env, "CLIENT_BODY_TIMEOUT", 30.0),
        client_body_idle_timeout=_seconds(env, "CLIENT_BODY_IDLE_TIMEOUT", 10.0),
        keepalive_timeout=_seconds(env, "KEEPALIVE_TIMEOUT", 30.0),
        client_write_timeout=_seconds(env, "CLIENT_WRITE_TIMEOUT", 30.0),
        backend_connect_timeout=_seconds(env, "BACKEND_CONNECT_TIMEOUT", 5.0),
        request_timeout=_seconds(env, "REQUEST_TIMEOUT", 300.0),
        stream_idle_timeout=_seconds(env, "STREAM_IDLE_TIMEOUT", 300.0),
        graceful_timeout=_seconds(env, "GRACEFUL_TIMEOUT", 30.0, lo=0.0),
        auth_enabled=_bool(env, "AUTH_ENABLED", True),
        auth_keys_file=keys_file,
        max_requests_per_minute=_int(env, "MAX_REQUESTS_PER_MINUTE", 120, 1, 10_000_000),
        max_concurrent_requests_per_key=_int(env, "MAX_CONCURRENT_REQUESTS_PER_KEY", 4, 1,
                                             1_000_000),
        max_concurrent_requests=_int(env, "MAX_CONCURRENT_REQUESTS", 8, 1, 1_000_000),
        max_queue_size=_int(env, "MAX_QUEUE_SIZE", 64, 0, 1_000_000),
        queue_timeout=_seconds(env, "QUEUE_TIMEOUT", 30.0),
        metrics_key=env.get("METRICS_KEY", "").strip(),
        cors_origins=_origins(env, "CORS_ORIGINS"),
        access_log_max_bytes=_int(env, "ACCESS_LOG_MAX_BYTES", 50_000_000, 4096, 1 << 40),
        access_log_backups=_int(env, "ACCESS_LOG_BACKUPS", 5, 0, 1000),
        model_path=(env.get("MODEL_PATH", "").strip()
                    or (os.path.join(data_dir, "models", env["MODEL_NAME"].strip())
                        if env.get("MODEL_NAME", "").strip() else "")),
        model_name=env.get("MODEL_NAME", "").strip(),
        worker_type=env.get("WORKER_TYPE", "").strip() or "instruct",
    )
    if cfg.port == cfg.port_health:
        raise ConfigError("PORT_HEALTH", f"must differ from PORT ({cfg.port})")
    return cfg
