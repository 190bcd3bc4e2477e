"""Long fuzz campaign over tiny packs: python tools/fuzz.py [--cases 100000] [--minutes M] [--seed S].

Builds a tiny llama checkpoint, converts it to f32 and re-quantizes it to q4 (with zero points),
then mutates them with tests/pack_fuzz.py (bit flips, truncations, JSON header edits with the CRC
recomputed) and loads and runs every case (numpy backend; onnxruntime every --ort-every cases).
Prints the count of every (mutation, outcome) pair and every case that is not allowed (a crash,
a hang, memory past the bound, or a flip/truncation that loaded with other logits). Exit 1 if
any. `--scope format` keeps JSON edits off what the model description validates (the model
section, tensor names; pack_fuzz.model_owned), `--scope model` fuzzes only that. Run it niced:
`nice -n 10 python tools/fuzz.py --minutes 10`.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pack_edit import requantize  # noqa: E402
from pack_fuzz import Fuzzer, allowed  # noqa: E402
from tiny_models import make_tiny  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=100_000)
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (whichever comes first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ort-every", type=int, default=10, help="every N-th case on onnxruntime (0: never)")
    p.add_argument("--scope", choices=["all", "format", "model"], default="all", help="which header nodes JSON "
                   "edits touch: all, all but the model description's part (format), or only that part (model)")
    args = p.parse_args(argv)
    from llmpack.converter import convert

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiny("llama", root / "ckpt", num_hidden_layers=2)
        convert(root / "ckpt", root / "f32.llmpack", dtype="f32", quiet=True)
        requantize(root / "f32.llmpack", root / "q4.llmpack", 4, 32, symmetric=False)
        fuzzer = Fuzzer({"f32": root / "f32.llmpack", "q4": root / "q4.llmpack"}, root, seed=args.seed,
                        ort_every=args.ort_every, scope=None if args.scope == "all" else args.scope)
        counts, bad = collections.Counter(), collections.Counter()
        examples = {}
        t0 = time.time()
        n = 0
        for n in range(1, args.cases + 1):
            kind, outcome, what = fuzzer.case("f32" if n % 2 else "q4")
            counts[kind, outcome] += 1
            if not allowed(kind, outcome):
                key = (outcome, what.split(" -> ")[-1][:80] if " -> " in what else what.split(":")[1][:60])
                bad[key] += 1
                examples.setdefault(key, what)
            if n % 5000 == 0:
                print(f"{n} cases, {time.time() - t0:.0f} s, not allowed: {sum(bad.values())}", file=sys.stderr)
            if args.minutes is not None and time.time() - t0 > 60 * args.minutes:
                break
        seconds = time.time() - t0
    print(f"{n} cases in {seconds:.0f} s ({n / seconds:.0f}/s), seed {args.seed}, onnxruntime every "
          f"{args.ort_every}, JSON edits: {args.scope}")
    for (kind, outcome), c in sorted(counts.items()):
        print(f"  {kind:<9} {outcome:<9} {c:>8}  {'ok' if allowed(kind, outcome) else 'NOT ALLOWED'}")
    for key, c in bad.most_common():
        print(f"  {c:>6} x {examples[key]}")
    return 1 if bad else 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Interpreter shutdown after thousands of onnxruntime sessions hung once in three runs (no
    # Python frame left): the report is out, so leave without it.
    os._exit(status)
