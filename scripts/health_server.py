"""The probe server for the platform (RunPod load-balancing contract), its own process.

    python3 scripts/health_server.py        # config from env: HOST, PORT_HEALTH, PORT, RUN_DIR

Any GET/HEAD path answers from the one-word state file `$RUN_DIR/health` that entrypoint.sh
writes (`starting`, `ready`, `failed`, `stopping`; missing, unreadable or anything else reads as
`starting`):

    starting                                    -> 204 (RunPod: initializing; no body)
    ready, and 127.0.0.1:PORT accepts a TCP connect -> 200 {"status":"ready"}
    ready, but the gateway port refuses         -> 503 {"status":"ready","gateway":"not accepting"}
    failed / stopping                           -> 503 {"status":"failed"} / {"status":"stopping"}
    any other method                            -> 405

It never sends a request to llama-server or to the gateway's API: the only traffic it makes is a
bare TCP connect+close to the gateway port, cached for GATEWAY_CHECK_TTL and re-done at once when
the state file is replaced. It imports little so that it answers within a fraction of a second of
the container's start. Bad config exits 2 naming the variable; SIGTERM/SIGINT exit 0.

The server is scripts/llamagw/health/ (prober.py decides an answer, server.py serves: its limits,
the connection cap, the non-blocking gateway check); of the package it loads only health/, config
and backend_state (tests/test_layout.py checks it).
"""

from __future__ import annotations

import signal
import socket
import sys

from llamagw import config
from llamagw.health.prober import Prober, probe_address
from llamagw.health.server import LISTEN_BACKLOG, HealthServer


def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(0)


def main() -> int:
    try:
        cfg = config.load_config()
    except config.ConfigError as exc:
        print(f"health_server: FATAL bad config: {exc}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((cfg.host, cfg.port_health))
    except OSError as exc:
        print(f"health_server: FATAL cannot listen on {cfg.host}:{cfg.port_health} "
              f"(PORT_HEALTH): {exc}", file=sys.stderr, flush=True)
        return 1
    listener.listen(LISTEN_BACKLOG)
    prober = Prober(cfg.health_file, probe_address(cfg.host), cfg.port)
    server = HealthServer(listener, prober)
    print(f"health_server: listening on {cfg.host}:{cfg.port_health}, state file "
          f"{cfg.health_file}, gateway check {prober.gateway[0]}:{cfg.port}, at most "
          f"{server.max_connections} connections", flush=True)
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
