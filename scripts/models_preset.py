#!/usr/bin/env python3
"""Generate llama-server's router preset from MODELS_DIR and the operator's MODELS_PRESET.

    python3 scripts/models_preset.py --models-dir D [--preset F] --out OUT [--preload a,b]
        [--max N] [--default NAME|FILE|PATH] [--ctx N] [--ngl N|auto|all] [--parallel N]

entrypoint.sh runs it before starting llama-server in router mode. On success it writes OUT
(atomically, mode 0600) and prints, one per line on stdout:
    models=NAME,...          every model, sorted
    default=NAME             the default model ("" when none)
    preload=NAME,...         written as load-on-startup (llama-server loads them at start)
    gateway_preload=NAME,... to load at start that llama-server cannot (MODELS_MAX=0)
and a summary plus warnings on stderr. Invalid input: the reason (file and line when it comes
from the preset) on stderr and exit 2. OUT not writable: exit 1.

--preload absent: the default model, if any; --preload "": none. --ctx/--ngl/--parallel are the
[*] defaults (CTX, NGL, PARALLEL in the environment); the preset's [*] and [name] win over them.
See llamagw/models/preset.py for the naming rules and the allowed keys.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llamagw.models import preset  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # usage errors: exit 2 like invalid input
        self.print_usage(sys.stderr)
        print(f"models_preset: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="models_preset.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", required=True)
    p.add_argument("--preset", default="", help="the operator's INI (optional)")
    p.add_argument("--out", required=True, help="where to write the generated INI")
    p.add_argument("--preload", default=None, help="comma-separated names")
    p.add_argument("--max", type=int, default=1, help="MODELS_MAX (0: no limit)")
    p.add_argument("--default", default="", help="the default model: name, file or path")
    p.add_argument("--ctx", default=None)
    p.add_argument("--ngl", default=None)
    p.add_argument("--parallel", default=None)
    args = p.parse_args(argv)
    defaults = {key: value for key, value in (("ctx-size", args.ctx),
                                              ("n-gpu-layers", args.ngl),
                                              ("parallel", args.parallel)) if value is not None}
    preload = None if args.preload is None else args.preload.split(",")
    try:
        gen = preset.generate(args.models_dir, args.preset, preload=preload,
                              models_max=args.max, default=args.default, defaults=defaults)
    except preset.PresetError as exc:
        print(f"models_preset: error: {exc}", file=sys.stderr)
        return 2
    try:
        gen.write(args.out)
    except OSError as exc:
        print(f"models_preset: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    for warning in gen.warnings:
        print(f"models_preset: warning: {warning}", file=sys.stderr)
    aliases = {}
    for alias, name in gen.aliases.items():
        aliases.setdefault(name, []).append(alias)
    shown = ", ".join(n + (f" (aliases {', '.join(aliases[n])})" if n in aliases else "")
                      for n in gen.names)
    print(f"models_preset: {len(gen.names)} model(s): {shown}; MODELS_MAX={args.max}; "
          f"preload: {', '.join(gen.preload + gen.gateway_preload) or 'none'}; "
          f"wrote {args.out}", file=sys.stderr)
    print("models=" + ",".join(gen.names))
    print("default=" + gen.default)
    print("preload=" + ",".join(gen.preload))
    print("gateway_preload=" + ",".join(gen.gateway_preload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
