"""llmpack inspect FILE — header, architecture, tensor table, sizes, provenance, quality report."""
from __future__ import annotations

import argparse
import json
from collections import Counter

from llmpack.formats.reader import Pack

EXAMPLE = """examples:
  llmpack inspect qwen05.llmpack
  llmpack inspect qwen05.llmpack --verify --tensors
"""


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="llmpack inspect", description=__doc__.split("—")[1].strip(),
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help=".llmpack file")
    p.add_argument("--verify", action="store_true", help="check every tensor's CRC32")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true", help="print the raw header as JSON")
    args = p.parse_args(argv)
    pack = Pack(args.file, verify=args.verify)
    h = pack.header
    if args.json:
        print(json.dumps({k: v for k, v in h.items()}, indent=1, ensure_ascii=False))
        return 0
    m = h["model"]
    size = pack.path.stat().st_size
    n_params = sum(_numel(t["shape"]) for t in h["tensors"] if t["type"] != "u8")
    print(f"file        {pack.path}  {size / 1e6:.1f} MB  format v{h['format_version']}"
          + ("  checksums OK" if args.verify else ""))
    # The model description is the runtime's business (it validates it at load): show what is there.
    print(f"family      {m.get('family')}  layers {m.get('n_layers')}  head_dim {m.get('head_dim')}  "
          f"norm {m.get('norm')}  act {m.get('act')}  context {m.get('context_length')}  "
          f"tied head {m.get('tied_head')}")
    emb = pack.tensors["embed.weight"]["shape"] if "embed.weight" in pack.tensors else ["?", "?"]
    vocab, hidden = (emb + ["?", "?"])[:2]
    print(f"size        vocab {vocab}  hidden {hidden}  parameters {n_params / 1e6:.1f} M  "
          f"file {8 * size / max(n_params, 1):.2f} bits/parameter (every byte of the file over every parameter)")
    print(f"weights     {_matrix_bits(h['tensors']):.3f} bits/weight over the 2-D weight matrices (codes, f16 scales "
          f"and zero points counted; norms, biases, tables and the tokenizer not)"
          + (f"; the converter recorded {prov_bpw}" if (prov_bpw := _recorded_bpw(h)) is not None else ""))
    by_type = Counter()
    for t in h["tensors"]:
        by_type[t["type"]] += sum(part[1] for part in t["parts"].values())
    print("storage     " + "  ".join(f"{k} {v / 1e6:.1f} MB" for k, v in by_type.most_common()))
    tok = h["tokenizer"]
    print(f"tokenizer   {tok.get('kind')}  specials {tok.get('special', {})}  "
          f"chat template {'yes' if tok.get('chat_template') else 'no'}")
    for line in _provenance_lines(h.get("provenance") or {}):
        print(line)
    recipe = h.get("recipe") if isinstance(h.get("recipe"), list) else []
    if recipe:
        steps = [_step_text(r) for r in recipe if isinstance(r, dict)]
        if any(isinstance(r, dict) and r.get("quality") for r in recipe):  # one step a line: each has figures
            print("recipe      " + "\n         -> ".join(steps))
        else:
            print("recipe      " + " -> ".join(steps))
    gen = h.get("generation") or {}
    if gen:
        print(f"generation  {json.dumps(gen)}")
    for q in h.get("quality") or []:
        print(f"quality     {_quality_line(q)}")
    if not h.get("quality"):
        print("quality     (no measurement recorded)")
    if args.tensors:
        for t in h["tensors"]:
            nbytes = sum(part[1] for part in t["parts"].values())
            g = f" g{t['group_size']}" if t.get("group_size") else ""
            print(f"  {t['name']:<40} {t['type']:<5}{g:<5} {str(tuple(t['shape'])):<18} {nbytes:>12,d} B")
    return 0


def _matrix_bits(tensors) -> float:
    """Storage bits per element of the 2-D weight matrices (embedding, linears, head), as the
    converter's provenance bits_per_weight counts them: all parts of each tensor, so quantized
    matrices include their f16 scales and packed zero points."""
    mats = [t for t in tensors if len(t["shape"]) == 2 and t["type"] != "u8" and not t["name"].startswith("rope.")]
    numel = sum(_numel(t["shape"]) for t in mats)
    return 8 * sum(part[1] for t in mats for part in t["parts"].values()) / max(numel, 1)


def _recorded_bpw(h):
    options = (h.get("provenance") or {}).get("options")
    return options.get("bits_per_weight") if isinstance(options, dict) else None


def _provenance_lines(prov: dict) -> list[str]:
    """The provenance record as a few labelled lines instead of one raw dict."""
    lines = [f"provenance  converter {prov.get('converter', '?')}"
             + (f", {prov['seconds']:.1f} s" if isinstance(prov.get("seconds"), (int, float)) else "")
             + f"; source: {len(prov.get('source') or {})} files hashed (sha256), weights in "
             + ", ".join(map(str, prov.get("source_dtypes") or ["?"]))]
    options = dict(prov.get("options") or {})
    calibration = options.pop("calibration", None)
    shown = {k: v for k, v in options.items() if v not in (None, [], {})}
    if shown:
        lines.append("  options   " + "  ".join(f"{k} {_compact(v)}" for k, v in shown.items()))
    if isinstance(calibration, dict):
        lines.append(f"  calibration  {calibration.get('text')}: {calibration.get('samples')} samples x "
                     f"{calibration.get('seqlen')} tokens (sha256 {str(calibration.get('sha256', ''))[:12]}…)")
    allocation = prov.get("allocation")
    if isinstance(allocation, dict):
        lines.append("  allocation  " + "  ".join(f"{k} {_compact(v)}" for k, v in allocation.items()))
    return lines


def _compact(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


_QUIET = {"step", "calib", "calib_samples", "calib_seqlen", "seed", "act_order", "damp", "keep", "dropped", "per_block_error",
          "quality"}


def _step_text(r: dict) -> str:
    """One recipe step: its name and the options that say what it did (e.g. "slice (fraction 0.25,
    width 672, 41.2 s)")."""
    opts = [f"{k} {_compact(v) if isinstance(v, dict) else v}" for k, v in r.items()
            if k not in _QUIET and v not in (None, [], {}) and k != "seconds"]
    if r.get("dropped"):
        opts.append("dropped " + ", ".join(str(d[0]) for d in r["dropped"] if isinstance(d, list) and d))
    if isinstance(r.get("seconds"), (int, float)):
        opts.append(f"{r['seconds']:.1f} s")
    text = f"{r.get('step')} ({', '.join(opts)})" if opts else str(r.get("step"))
    return text + (f" [then {_step_quality(r['quality'])}]" if isinstance(r.get("quality"), dict) else "")


def _step_quality(q: dict) -> str:
    """The quality a step's record carries (measured after that step with --eval)."""
    try:
        if q.get("ppl_ratio") is None and q.get("bpb_ratio") is not None:  # a trimmed vocabulary
            return f"bits/byte x{q['bpb_ratio']:.3f}, KLD {q['kld']:.4f} and top-1 {100 * q['top1']:.1f} % where read alike"
        return f"KLD {q['kld']:.4f}, top-1 {100 * q['top1']:.1f} %, PPL x{q['ppl_ratio']:.3f}"
    except (KeyError, TypeError, ValueError):
        return _compact(q)


def _quality_line(q: dict) -> str:
    """One readable line of a stored measurement (the raw record if it lacks the usual fields)."""
    try:
        if q.get("tokenization") == "own":  # a trimmed vocabulary: each model read the text its own way
            kld = "n/a" if q["kld"] is None else f"{q['kld']:.4f} nats, top-1 {100 * q['top1']:.2f} %"
            return (f"bits/byte {q['bpb']:.4f} vs {q['bpb_ref']:.4f} (ratio {q['bpb_ratio']:.4f}); KLD {kld} on the "
                    f"{100 * q.get('compared_positions', 0):.0f} % of positions read alike; against the "
                    f"{q.get('reference', 'reference')} on {q['text']}, {q['windows']} windows of <= {q['ctx']} tokens")
        return (f"KLD {q['kld']:.4f} nats (p99 {q['kld_p99']:.3f}), top-1 {100 * q['top1']:.2f} %, perplexity "
                f"{q['ppl']:.3f} vs {q['ppl_ref']:.3f} (ratio {q['ppl_ratio']:.4f}) against the "
                f"{q.get('reference', 'reference')} on {q['text']}, {q['windows']} x {q['ctx']} tokens")
    except (KeyError, TypeError, ValueError):
        return json.dumps(q)
