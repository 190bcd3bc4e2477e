"""llmpack eval FILE --reference REF --text TEXT — how far FILE's next-token predictions are from REF's.

Part of the CLI glue rather than runtime/: a transformers folder as REF needs the converter side
(torch), while a .llmpack REF needs only the runtime."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmpack.formats.errors import LlmpackError

EXAMPLE = """examples:
  llmpack eval qwen05-q4.llmpack --reference qwen05-f32.llmpack --text standards.txt
  llmpack eval qwen05-q4.llmpack --reference ./Qwen2.5-Coder-0.5B-Instruct --text standards.txt --windows 32

REF is another .llmpack (an f32 pack, then no torch is needed) or a transformers folder
(torch is imported to run it). Prints mean KL(ref||file) in nats, top-1 agreement and both
perplexities over WINDOWS non-overlapping windows of CTX tokens of TEXT, and both models' bits
per byte. When the two tokenize TEXT differently (a trimmed vocabulary, convert --vocab-size),
each model reads the same text windows (cut at line ends) with its own tokenizer: bits per byte
for both, KLD and top-1 over the windows both tokenize alike (and their share).
"""


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="llmpack eval", description=__doc__.split("—")[1].strip(),
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help=".llmpack file to measure")
    p.add_argument("--reference", required=True, help="reference: .llmpack file or transformers folder")
    p.add_argument("--text", required=True, help="UTF-8 text file to evaluate on (not the calibration text)")
    p.add_argument("--windows", type=int, default=16, help="number of windows (default 16)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "onnxruntime"],
                   help="backend for .llmpack files (default numpy: the exact reference math)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    from llmpack.runtime.quality import evaluate_files

    reference, ref_tokenizer = args.reference, None
    if Path(reference).is_dir():
        from llmpack.converter.reference import hf_logits_fn, hf_tokenizer  # torch only inside

        if not (Path(reference) / "config.json").is_file():
            raise LlmpackError(f"reference {reference} has no config.json (give a transformers checkpoint "
                               "folder or a .llmpack file)")
        ref_tokenizer = hf_tokenizer(reference)
        reference = hf_logits_fn(reference, args.quiet)
    r = evaluate_files(args.file, reference, args.text, windows=args.windows, ctx=args.ctx, quiet=args.quiet,
                       backend=args.backend, ref_tokenizer=ref_tokenizer)
    if args.json:
        print(json.dumps(r))
        return 0
    if r.get("tokenization") == "own":
        return _print_cross(r)
    print(f"text        {r['text']}  {r['windows']} windows x {r['ctx']} tokens  ({r['positions']} positions)")
    print(f"KLD         {r['kld']:.6f} nats (mean KL(ref||file); p99 {r['kld_p99']:.4f})")
    print(f"top-1       {100 * r['top1']:.2f} % agreement")
    print(f"perplexity  file {r['ppl']:.4f}  reference {r['ppl_ref']:.4f}  ratio {r['ppl_ratio']:.5f}")
    print(f"bits/byte   file {r['bpb']:.4f}  reference {r['bpb_ref']:.4f}  ratio {r['bpb_ratio']:.5f}")
    return 0


def _print_cross(r: dict) -> int:
    """The report of two models that tokenize the text differently."""
    print(f"text        {r['text']}  {r['windows']} windows of whole lines, each model with its own tokenizer "
          f"({r['tokens']} tokens; reference {r['tokens_ref']})")
    print(f"bits/byte   file {r['bpb']:.4f}  reference {r['bpb_ref']:.4f}  ratio {r['bpb_ratio']:.5f}")
    share = (f"{100 * r['identical_windows']:.1f} % of windows tokenized alike, {r['positions']} positions "
             f"({100 * r['compared_positions']:.1f} %) with the same context")
    if r["kld"] is None:
        print(f"KLD         n/a: no position has the same context in both ({share})")
        return 0
    print(f"KLD         {r['kld']:.6f} nats over the shared tokens (p99 {r['kld_p99']:.4f}; {share})")
    print(f"top-1       {100 * r['top1']:.2f} % agreement; reference mass on removed tokens "
          f"{100 * r['ref_mass_removed']:.2f} %")
    return 0
