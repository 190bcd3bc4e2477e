"""llmpack convert SRC -o OUT.llmpack — transformers checkpoint folder -> one packed file."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from llmpack.formats.errors import LlmpackError

EXAMPLE = """examples:
  llmpack convert ./Qwen2.5-Coder-0.5B-Instruct -o qwen05.llmpack --dtype f16
  llmpack convert ./Qwen2.5-Coder-0.5B-Instruct -o qwen05-q4.llmpack --bits 4 --method gptq --eval
  llmpack convert SRC -o q4.llmpack --bits 4 --method awq+gptq --keep head=8 --eval-text standards.txt
  llmpack convert SRC -o mixed.llmpack --target-bpw 3.5 --method gptq
  llmpack convert SRC -o small.llmpack --target-size 126MB --method gptq --sensitivity sens.json --eval
  llmpack convert SRC -o plan.llmpack --plan-only --sensitivity sens.json   # size/KLD table + plan.plan.png
  llmpack convert SRC -o small.llmpack --slice 0.2 --prune-mlp 0.2 --bits 4 --method gptq --eval
  llmpack convert SRC -o sparse.llmpack --bits 4 --method gptq --sparsity 2:4
  llmpack convert SRC -o trimmed.llmpack --bits 4 --vocab-size 32768          # keep 32k tokens
  llmpack convert SRC -o q2-healed.llmpack --bits 2 --method gptq --heal --heal-tokens 65536 --eval

methods: rtn (round to nearest, clipping range searched per group; no calibration),
gptq (layer by layer on calibration activations), awq (activation-aware scales + RTN),
awq+gptq. GPTQ/AWQ/--target-bpw calibrate on --calib FILE, by default on the shipped
calibration text (the Python tutorial, see converter/quantize/data/SOURCE.md).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmpack convert", description=__doc__.split("—")[1].strip(),
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="transformers checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("-o", "--output", required=True, help="output .llmpack file (written atomically)")
    p.add_argument("--dtype", default="f16", help="f32, f16, bf16 or q8: storage of the weight matrices "
                   "when not quantizing (norms and biases stay f32; q8 = --bits 8); default f16")
    _quantization_options(p)
    _structure_options(p)
    _vocabulary_options(p)
    _calibration_options(p)
    _healing_options(p)
    _measurement_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def _quantization_options(p: argparse.ArgumentParser):
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", type=_int, help="quantize every weight matrix (embedding and head row-wise) "
                   "to 8, 4, 3 or 2 bits")
    q.add_argument("--group-size", type=_int, default=None,
                   help="quantization group along the input dim: 16, 32, 64, 128 or 256 (default 32; with "
                        "--target-bpw and no --group-size, chosen per tensor among 32, 64, 128)")
    q.add_argument("--method", default="rtn", help="rtn, gptq, awq (AWQ scales + RTN) or awq+gptq (default rtn)")
    q.add_argument("--symmetric", action="store_true", default=None,
                   help="no zero points (default: symmetric at 8 bits, zero points below)")
    q.add_argument("--keep", action="append", default=[], metavar="PATTERN=BITS",
                   help="per-tensor override, PATTERN a regex on the llmpack or checkpoint tensor name, "
                        "BITS 8/4/3/2 or f16/f32 (repeatable; e.g. --keep head=8 --keep 'mlp.down=4')")
    q.add_argument("--target-bpw", type=_float, metavar="X",
                   help="pick per-tensor bits (2/3/4/8) from measured sensitivity for an average of X bits per "
                        "weight over the weight matrices (scales and zero points counted); needs torch once "
                        "for a gradient pass")
    q.add_argument("--target-size", metavar="SIZE",
                   help="plan per-tensor bits and groups for a file of at most SIZE: bytes, kB/MB/GB, KiB/MiB/GiB "
                        "(126MB) or a ratio to the source's bf16 size (10x); every byte counted (header, "
                        "tokenizer, norms); calibrates like --target-bpw")
    q.add_argument("--plan-only", action="store_true",
                   help="print the size / predicted-KLD frontier (table, and OUT with .plan.png as a plot) "
                        "and write no pack; with --sensitivity FILE a second run costs no measurement")
    q.add_argument("--keep-vocab", action="store_true",
                   help="--target-size/--plan-only: keep every token (by default the planner also weighs "
                        "trimming the vocabulary, measured on calibration text)")
    q.add_argument("--search-structure", action="store_true",
                   help="--target-size/--plan-only: also weigh dropping blocks and pruning MLP neurons, measured on "
                        "calibration text (off by default: on the models measured it helped at some sizes and "
                        "hurt at others, docs/plan.md)")
    q.add_argument("--sensitivity", metavar="FILE",
                   help="--target-bpw/--target-size: keep the measured per-tensor sensitivity in FILE and reuse it "
                        "when FILE matches this checkpoint, calibration and options (another target then skips "
                        "the measurement, like llama.cpp's --imatrix)")
    q.add_argument("--sparsity", metavar="S",
                   help="prune the decoder layers' weights (embedding and head stay dense), stored so the file "
                        "really shrinks: a fraction in (0, 1) (unstructured, e.g. 0.5) or 2:4; needs --bits; "
                        "Wanda-style selection, SparseGPT-style with --method gptq; calibrates")


def _structure_options(p: argparse.ArgumentParser):
    st = p.add_argument_group("structure (calibrated; composes with quantization, applied in this order)")
    st.add_argument("--drop-layers", type=_int, metavar="N", help="remove N whole layers, chosen one at a time by "
                    "the measured KL divergence of dropping each")
    st.add_argument("--slice", type=_float, metavar="F", help="SliceGPT: remove fraction F of the hidden size "
                    "(PCA of each layer's input; rotations folded into the weights)")
    st.add_argument("--prune-heads", type=_float, metavar="N|F", help="remove N KV head groups per layer (or a "
                    "fraction F < 1), least important first (|W_o| x ||context||)")
    st.add_argument("--prune-mlp", type=_float, metavar="F", help="remove fraction F of each layer's MLP neurons, "
                    "least important first (|W_down| x ||activation||), mean contribution kept as a bias")


def _vocabulary_options(p: argparse.ArgumentParser):
    v = p.add_argument_group("vocabulary (the embedding and head keep only these tokens' rows)")
    v.add_argument("--vocab-size", type=_int, metavar="N", help="keep the N tokens a corpus uses most (special "
                   "tokens, the byte alphabet and what kept tokens are merged from always stay: any text still "
                   "encodes)")
    v.add_argument("--tie-head", action="store_true", help="store an untied head as the embedding times a fitted "
                   "d x d map (least squares): one matrix fewer; for heads that equal the embedding up to a linear "
                   "map (GGUF-derived checkpoints of tied models); --target-size weighs it by itself")
    v.add_argument("--vocab-from", nargs="+", metavar="FILE", help="the corpus to count tokens on (default: the "
                   "shipped calibration text, English prose and Python code); alone: keep every token it uses")


def _calibration_options(p: argparse.ArgumentParser):
    c = p.add_argument_group("calibration (gptq, awq, --target-bpw, --sparsity, structure)")
    c.add_argument("--calib", metavar="FILE", help="calibration text file (default: the shipped text)")
    c.add_argument("--calib-samples", type=_int, default=16, help="calibration windows (default 16)")
    c.add_argument("--calib-seqlen", type=_int, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--seed", type=_int, default=0, help="seed for sample choice (default 0)")
    c.add_argument("--no-act-order", action="store_true", help="GPTQ: keep the natural column order")
    c.add_argument("--damp", type=_float, default=0.01, help="GPTQ damping, fraction of mean diag(H) (0.01)")


def _healing_options(p: argparse.ArgumentParser):
    h = p.add_argument_group("healing (trains the compressed model against the original; torch, calibrates)")
    h.add_argument("--heal", action="store_true", help="after compression, train each block to reproduce the "
                   "original's (block-wise), then the file's scales and norms against the original's next-token "
                   "distribution (end to end), on the calibration text; resumable (OUT.heal/)")
    h.add_argument("--heal-tokens", type=_tokens, metavar="N|auto", help="training tokens of each phase "
                   "(block-wise: per block); default 32768. auto: each block and the end-to-end phase train until "
                   "a pass over the calibration text cuts the error on held-out calibration rows by under 1 %% "
                   "(at most 65536 tokens each)")
    h.add_argument("--heal-device", metavar="cpu|cuda", help="where healing trains (default cpu)")


def _measurement_options(p: argparse.ArgumentParser):
    e = p.add_argument_group("measurement")
    e.add_argument("--eval", action="store_true",
                   help="measure KLD/top-1/PPL against the source on the shipped evaluation text (three Python "
                        "HOWTOs, not the calibration text) and store the report in the file; `inspect` shows it")
    e.add_argument("--eval-text", metavar="TEXT", help="the same on your own text file (implies --eval)")
    e.add_argument("--eval-windows", type=_int, default=16, help="windows of the measurement (default 16)")
    e.add_argument("--eval-ctx", type=_int, default=512, help="tokens per window (default 512)")


def _int(s):
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")


def _tokens(s):
    return "auto" if s == "auto" else _int(s)


def _float(s):
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")


def main(argv) -> int:
    parser = build_parser()
    # argparse's own errors print usage + message; make them the same one-line errors as ours.
    parser.error = lambda message: (_ for _ in ()).throw(LlmpackError(message))
    args = parser.parse_args(argv)
    for mod in ("torch", "transformers", "safetensors"):
        if importlib.util.find_spec(mod) is None:
            raise LlmpackError(f"convert needs {mod}: pip install 'llmpack[convert]'")
    from .convert import convert
    from .quantize.calib import default_eval_path

    eval_text = args.eval_text or (default_eval_path() if args.eval else None)

    try:
        convert(args.src, args.output, dtype=args.dtype, group_size=args.group_size, quiet=args.quiet,
                bits=args.bits, method=args.method, keep=args.keep, target_bpw=args.target_bpw, calib=args.calib,
                calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                symmetric=args.symmetric, act_order=not args.no_act_order, damp=args.damp,
                eval_text=eval_text, eval_windows=args.eval_windows, eval_ctx=args.eval_ctx,
                sensitivity_file=args.sensitivity, slice=args.slice, prune_mlp=args.prune_mlp,
                prune_heads=args.prune_heads, drop_layers=args.drop_layers, sparsity=args.sparsity,
                heal=args.heal, heal_tokens=args.heal_tokens, heal_device=args.heal_device,
                vocab_size=args.vocab_size, vocab_from=args.vocab_from,
                target_size=args.target_size, plan_only=args.plan_only, keep_vocab=args.keep_vocab, tie_head=args.tie_head,
                search_structure=args.search_structure)
    except KeyboardInterrupt:
        kept = Path(args.output + ".heal")
        if args.heal and kept.is_dir():
            print(f"\nllmpack convert: interrupted; healing checkpoints kept in {kept}: run the same command "
                  f"to resume", file=sys.stderr)
        raise
    return 0
