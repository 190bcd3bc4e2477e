#!/usr/bin/env python3
"""What loading a sparse file costs: load seconds and resident memory, dense vs sparse files.

    python tools/sparse_load.py q4.llmpack q4-s50.llmpack q4-s24.llmpack [--backend onnxruntime] [--rounds 3]

No kernel runs the sparse types (q{b}s24, q{b}m) sparse: the onnxruntime backend expands each
sparse matrix at load into the dense MatMulNBits layout (formats.sparse.expand), in private
memory, where a dense file's weights are mapped from the file. Every load runs in a fresh
subprocess (its own peak RSS); rounds alternate between the files so machine drift hits all
alike; the best load time of the rounds is reported. Per file: size, load seconds, RSS after
load and peak RSS (VmHWM, which includes the transient expansion buffers) in MB, and the
private (anonymous) part of RSS (RssAnon): the expanded copies live there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from llmpack.runtime import load
t = time.perf_counter()
m = load(sys.argv[1], backend=sys.argv[2], threads=1)
secs = time.perf_counter() - t
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: int(status[k].split()[0]) / 1024
print(json.dumps({"load_s": secs, "rss_mb": kb("VmRSS"), "peak_mb": kb("VmHWM"), "anon_mb": kb("RssAnon")}))
"""


def measure(path: str, backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, backend], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for f in args.files:
            r = measure(f, args.backend)
            if f not in best or r["load_s"] < best[f]["load_s"]:
                best[f] = r
    print(f"| file | MB | backend | load s | RSS MB | peak RSS MB | private (anon) MB |")
    print("|---|---|---|---|---|---|---|")
    for f, r in best.items():
        print(f"| {Path(f).name} | {Path(f).stat().st_size / 1e6:.1f} | {args.backend} | {r['load_s']:.2f} | "
              f"{r['rss_mb']:.0f} | {r['peak_mb']:.0f} | {r['anon_mb']:.0f} |")


if __name__ == "__main__":
    main()
