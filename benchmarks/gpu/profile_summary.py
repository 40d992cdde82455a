#!/usr/bin/env python3
"""Where the samples of a ``py-spy record --subprocesses -f raw`` profile went, process by process.

pending.sh's ``dataload`` section samples the data benchmark with py-spy: the main process (GPU
decode, prefetch, pinning), its loader workers and the moto S3 server. A flamegraph of all of it
at once hides the question that matters for the data path: which process is busy, and with what.
This prints, per process role, the share of samples and its top functions (self time), and the
share of the main process that touches a few named parts of the data path.

    python benchmarks/gpu/profile_summary.py dataprof-s3.txt [--top 15]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

PROCESS = re.compile(r'process (\d+):"([^"]*)"')
# Parts of the main process's work worth a line of their own (substring of a frame).
PARTS = ("Prefetcher", "DeviceDecoder", "pin_memory", "_recv", "rebuild_storage", "decode_jpeg", "synchronize")


def role(cmdline: str) -> str:
    if "moto_server" in cmdline:
        return "moto S3 server"
    if "resource_tracker" in cmdline:
        return "multiprocessing resource tracker"
    if "spawn_main" in cmdline or "multiprocessing-fork" in cmdline:
        return "loader worker"
    return "main process"


def summarize(path: str, top: int) -> str:
    samples: dict[str, Counter[str]] = defaultdict(Counter)
    parts: Counter[str] = Counter()
    pids: dict[str, set[str]] = defaultdict(set)
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            procs = PROCESS.findall(stack)
            if not procs:
                continue
            pid, cmdline = procs[-1]  # the innermost process: a worker's line starts with its parent's
            who = role(cmdline)
            # (a spawned worker's command line holds a ";" itself: drop the process parts first)
            frames = [fr for fr in PROCESS.sub("", stack).split(";") if fr]
            if any("_find_and_load" in fr for fr in frames):
                who = f"{who}, importing"  # start-up, apart from the steady state
            pids[who].add(pid)
            samples[who][frames[-1] if frames else "(a thread with no Python frame: native code)"] += n
            if who == "main process":
                for part in PARTS:
                    if any(part in fr for fr in frames):
                        parts[part] += n
            total += n
    lines = [f"{total} samples in {len(set().union(*pids.values()))} processes"]
    for who, counter in sorted(samples.items(), key=lambda kv: -sum(kv[1].values())):
        got = sum(counter.values())
        lines.append(f"\n{who} ({len(pids[who])} processes): {got / total:.1%} of samples")
        lines += [f"  {n / got:6.1%}  {frame[:150]}" for frame, n in counter.most_common(top)]
    main = sum(samples["main process"].values())
    if main:
        lines.append("\nmain process, inclusive:")
        lines += [f"  {parts[p] / main:6.1%}  {p}" for p in PARTS if parts[p]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    print(summarize(args.profile, args.top))


if __name__ == "__main__":
    main()
