#!/usr/bin/env python3
"""Download models named by URL or hub name into a folder, once, before llama-server starts.

    python3 scripts/fetch_model.py --dir DIR [--name FILE.gguf] [--sha256 HEX] --one SPEC
    python3 scripts/fetch_model.py --dir DIR SPEC,SPEC,...        (MODELS_URLS: several models)
    python3 scripts/fetch_model.py --check SPEC,SPEC,...          (no network: is it well formed?)

SPEC: http(s)://HOST/PATH/NAME.gguf, hf://OWNER/REPO/PATH.gguf or hf://OWNER/REPO:QUANT, with
optional #sha256=HEX&name=FILE.gguf (see scripts/llamagw/models/hub.py). The environment gives
HF_ENDPOINT (default https://huggingface.co) and HF_TOKEN (sent as a bearer token to
HF_ENDPOINT's host only; never logged).

entrypoint.sh runs it while the health server answers 204. On success it prints the path of each
model on stdout, one a line, in the order given; progress (percent, MB/s, ETA every few seconds)
and errors go to stderr. Workers sharing DIR download each file once (llamagw/models/fetch.py).
Exit 0: every model is there, verified; 1: a download failed (network, checksum, disk space,
deadline); 2: a SPEC names nothing usable (malformed, no such repository or file, no or several
QUANT matches); 143: SIGTERM (the partial download is kept and resumed next time). --check
prints the specs as they are logged (no query strings), comma-separated, then a line of their
local file names where they are known without the network (empty for a QUANT), or exits 2.
entrypoint.sh starts the download with --checked and a --check beside it: the check reports a
malformed SPEC, the download exits 2 without a second error line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llamagw.models import fetch, hub  # noqa: E402
from llamagw.models.download import DownloadError  # noqa: E402

# The whole job (resolving, waiting for another worker, downloading) must end within this: a
# 100 GB model at 10 MB/s takes under 3 hours.
DEADLINE_S = 4 * 3600.0
# How often the parent (entrypoint.sh) is checked: a download orphaned by a killed entrypoint
# stops within this.
PARENT_CHECK_S = 1.0


def log(level: str, msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} fetch_model {level}: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    log("INFO", msg)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        log("ERROR", message)
        sys.exit(2)


def _on_term(signum, _frame):
    raise SystemExit(128 + signum)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            log("ERROR", "the process that started this download is gone: stopping")
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="fetch_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("specs", help="SPEC, or comma-separated SPECs")
    p.add_argument("--dir", type=Path, help="where the models go")
    p.add_argument("--name", help="the local file name (one SPEC only)")
    p.add_argument("--sha256", help="the expected sha256 (one SPEC only)")
    p.add_argument("--one", action="store_true",
                   help="SPECS is a single SPEC, commas included (MODEL_URL)")
    p.add_argument("--check", action="store_true", help="check the SPECs without the network")
    p.add_argument("--checked", action="store_true",
                   help="a --check of the same SPECs runs beside this one and reports a bad "
                        "SPEC: exit 2 without a second error line")
    p.add_argument("--timeout", type=float, default=DEADLINE_S, help="seconds for everything")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between lines")
    args = p.parse_args(argv)
    try:
        specs = [hub.parse(args.specs)] if args.one else hub.parse_list(args.specs)
        if (args.name or args.sha256) and len(specs) != 1:
            raise hub.SourceError("--name and --sha256 go with a single SPEC")
        if args.name or args.sha256:
            specs = [_override(specs[0], args.name, args.sha256)]
    except hub.SourceError as exc:
        if not args.checked:
            log("ERROR", str(exc))
        return 2
    if args.check:
        print(",".join(s.shown for s in specs))
        print(",".join(s.name or "" for s in specs))
        return 0
    if args.dir is None:
        p.error("--dir is required")
    signal.signal(signal.SIGTERM, _on_term)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    deadline = time.monotonic() + args.timeout
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co") or hub.DEFAULT_ENDPOINT
    token = os.environ.get("HF_TOKEN") or None
    try:
        sources = [fetch.resolve(s, args.dir, endpoint=endpoint, token=token, log=info,
                                 deadline=deadline) for s in specs]
        names = [s.filename for s in sources]
        if len(set(names)) != len(names):
            raise hub.SourceError(f"two SPECs name the same file: {', '.join(names)}")
        paths = [fetch.ensure(s, args.dir, log=info, log_every=args.progress_every,
                              deadline=deadline) for s in sources]
    except hub.SourceError as exc:
        log("ERROR", str(exc))
        return 2
    except DownloadError as exc:
        log("ERROR", str(exc))
        return 1
    except OSError as exc:
        log("ERROR", f"{args.dir}: {exc}")
        return 1
    for path in paths:
        print(path.absolute())
    return 0


def _override(spec: hub.Spec, name: str | None, sha256: str | None) -> hub.Spec:
    if name:
        hub.check_filename(name, spec.shown)
    if sha256:
        if not hub.SHA256_RE.match(sha256):
            raise hub.SourceError(f"MODEL_SHA256 {sha256!r}: not 64 hex digits")
        if spec.sha256 and spec.sha256 != sha256.lower():
            raise hub.SourceError(f"{spec.shown}: two different sha256 given")
    return dataclasses.replace(spec, sha256=(sha256 or "").lower() or spec.sha256,
                               name=name or spec.name)


if __name__ == "__main__":
    sys.exit(main())
