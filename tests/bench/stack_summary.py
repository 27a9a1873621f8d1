"""Summarize collapsed stacks (py-spy `record -f raw`, one "frame;frame;... count" per line).

    python3 tests/bench/stack_summary.py spy.txt [--top 25] [--thread MainThread]

Prints, as a share of all samples: self time per function (the leaf frame), inclusive time per
function (counted once per sample however deep it recurs), and idle share (samples whose leaf is
the selector's poll). py-spy itself: `pip install py-spy` into the venv, then
`py-spy record -p PID -d 5 -r 500 -f raw -o spy.txt --nonblocking` while a case runs.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

# py-spy frame text: "function (file.py:line)"; keep "function (file.py)" so lines merge.
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^():]+?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('fn')} ({m.group('file').rsplit('/', 1)[-1]})"


def summarize(lines, thread: str | None = None):
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        line = line.rstrip("\n")
        if not line or " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        if thread and frames and thread not in frames[0]:
            continue
        names = [frame_name(f) for f in frames if f and not f.startswith(("process ", "thread "))]
        if not names:
            continue
        total += n
        self_t[names[-1]] += n
        for name in set(names):
            incl[name] += n
    return total, self_t, incl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--thread", default=None, help="keep stacks whose first frame contains this")
    args = p.parse_args(argv)
    with open(args.path) as f:
        total, self_t, incl = summarize(f, args.thread)
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples")
    print("\n-- self (leaf frame) --")
    for name, n in self_t.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {name}")
    print("\n-- inclusive --")
    for name, n in incl.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
