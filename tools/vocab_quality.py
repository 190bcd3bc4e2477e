#!/usr/bin/env python3
"""Bits per byte of packs with different vocabularies against their transformers source, on one text.

    python tools/vocab_quality.py MODEL_DIR A.llmpack B.llmpack ... [--text FILE] [--windows 16] [--ctx 512]
                                  [--json OUT.json]

Every pack (trimmed or not) reads the same text windows (cut at line ends, each fitting `ctx`
tokens under every tokenizer, runtime/quality_cross.py) with its own tokenizer; the reference
(float32 transformers) runs once per window and every pack is scored against it: bits per byte
and its ratio to the reference, and KLD / top-1 over the windows a pack tokenizes as the
reference does. llmpack files run on the numpy backend (exact dequantization). Default text:
the shipped evaluation text (converter/quantize/data/evaluation.txt), never calibrated on.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="transformers checkpoint folder (the reference)")
    p.add_argument("packs", nargs="+", help=".llmpack files to score")
    p.add_argument("--text", help="evaluation text (default: the shipped evaluation text)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--json", help="write the reports here")
    args = p.parse_args(argv)
    from llmpack.converter.quantize.calib import default_eval_path
    from llmpack.converter.reference import hf_logits_fn, hf_tokenizer
    from llmpack.runtime import load
    from llmpack.runtime.quality_cross import CrossAccumulator, text_windows, window_ids

    text = Path(args.text or default_eval_path()).read_text(encoding="utf-8")
    ref_tok = hf_tokenizer(args.model)
    models = [load(f, backend="numpy") for f in args.packs]
    pieces = text_windows([ref_tok] + [m.tokenizer for m in models], text, args.windows, args.ctx)
    ref = hf_logits_fn(args.model, quiet=True)
    accs = [CrossAccumulator(m.tokenizer, ref_tok) for m in models]
    t0 = time.time()
    for i, piece in enumerate(pieces):
        ref_ids = window_ids(ref_tok, piece)
        ref_logits = ref(np.asarray(ref_ids, np.int64))
        for m, acc in zip(models, accs):
            ids = window_ids(m.tokenizer, piece)
            acc.add(ref_logits, ref_ids, m.logits(ids), ids)
        print(f"window {i + 1}/{len(pieces)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    for f, acc in zip(args.packs, accs):
        r = acc.report()
        r.update(file=str(f), file_bytes=Path(f).stat().st_size, windows=acc.windows, ctx=args.ctx,
                 text_bytes=sum(len(x.encode("utf-8")) for x in pieces))
        rows.append(r)
    print("| file | MB | tokens | bits/byte | ref bits/byte | bpb ratio | windows alike | positions alike | "
          "KLD (alike) | top-1 % | ref mass removed % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kld = "n/a" if r["kld"] is None else f"{r['kld']:.4f}"
        top1 = "n/a" if r["top1"] is None else f"{100 * r['top1']:.2f}"
        mass = "n/a" if r["ref_mass_removed"] is None else f"{100 * r['ref_mass_removed']:.3f}"
        print(f"| {Path(r['file']).name} | {r['file_bytes'] / 1e6:.1f} | {r['tokens']} | {r['bpb']:.4f} | "
              f"{r['bpb_ref']:.4f} | {r['bpb_ratio']:.4f} | {100 * r['identical_windows']:.0f} % | "
              f"{100 * r['compared_positions']:.1f} % | {kld} | {top1} | "
              f"{mass} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
