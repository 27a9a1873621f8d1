#!/usr/bin/env python3
"""One look at llama-server's router: are the preload models loaded yet?

    python3 scripts/models_ready.py (--socket PATH.sock | --port N) --models a,b [--load c,d]

entrypoint.sh calls it every LOAD_POLL_INTERVAL while the router starts in router mode (it is
one short check, so a SIGTERM to the entrypoint is never held up by it). --load first asks the
router to load those models (POST /models/load: the MODELS_PRELOAD models that llama-server's
own load-on-startup cannot take, with MODELS_MAX=0); "already running" is fine.
It reads GET /models (autoload=false) into the gateway's catalog and exits:
    0  every model of --models is loaded
    1  one of them failed to load (the reason on stdout), or the router refused a --load
    3  not yet (states on stdout); also when the router does not answer (yet)
Nothing here waits longer than the client's request timeout (REQUEST_TIMEOUT_S).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llamagw.models.catalog import Catalog, CatalogError, State  # noqa: E402
from llamagw.models.router import RouterClient, RouterError, error_message  # noqa: E402

# One look: the router answers /models in ms; 2 s means it is not up (or stuck): "not yet".
REQUEST_TIMEOUT_S = 2.0


async def check(client: RouterClient, names: list[str], load: list[str]) -> tuple[int, str]:
    for name in load:
        status, body = await client.request("POST", "/models/load",
                                            json.dumps({"model": name}).encode())
        if status != 200 and "already running" not in error_message(body):
            return 1, f"{name}: llama-server refused to load it ({status}: " \
                      f"{error_message(body)})"
    status, body = await client.request("GET", "/models")
    if status != 200:
        return 3, f"GET /models: status {status}"
    catalog = Catalog()
    catalog.replace(body)
    states = []
    for name in names:
        m = catalog.get(name)
        if m is None:
            return 1, f"{name}: llama-server does not list it"
        if m.state is State.FAILED:
            return 1, f"{name}: {m.failure}"
        states.append(f"{name}={m.state.value}")
    if all(catalog.get(n).state is State.LOADED for n in names):
        return 0, " ".join(states)
    return 3, " ".join(states)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="models_ready.py")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", default="")
    where.add_argument("--port", type=int, default=0)
    p.add_argument("--models", default="")
    p.add_argument("--load", default="")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    load = [n for n in args.load.split(",") if n]
    client = RouterClient(args.socket, port=args.port, connect_timeout=REQUEST_TIMEOUT_S,
                          request_timeout=REQUEST_TIMEOUT_S)
    try:
        code, text = asyncio.run(check(client, names, load))
    except (RouterError, CatalogError) as exc:
        code, text = 3, str(exc)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
