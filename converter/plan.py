"""--target-size and --plan-only: a file-size budget becomes per-tensor bits and group sizes.

Users think in file sizes, the allocator (quantize/sensitivity.py) in damages and costs. The
planner makes the cost of every choice the bytes it adds to the file, so that the allocator's
budget is the target itself:

    file = 64 (prefix) + sum over tensor parts of align64(part bytes) + len(JSON header)

exactly (the writer starts every part at a multiple of 64 and the header after the last one).
Each weight matrix the allocator chooses for costs, per (bits, group) option, its aligned parts
(formats/spec.part_layout, as the writer lays them out) plus its entry in the header's tensor
directory, rendered with the widest values it can take (offsets with as many digits as the
largest possible data region, CRC32 4294967295). Everything else is fixed and counted the same
way: norms, biases, RoPE tables and other vectors in f32, --keep'd matrices, the tokenizer
blob, and the rest of the header (model description, config, tokenizer section, provenance,
recipe records with their timings at their widest) as convert.py writes it. The one part not
known before writing is the quality report of --eval: QUALITY_RESERVE bytes are set aside for
it (a report is ~450 bytes plus the text's name). So the planned size is an upper bound of the
written size, by construction; convert.py checks the written file against the target anyway.

The frontier (--plan-only) re-solves the same allocation for a range of sizes from the
smallest reachable (every matrix at 2 bits, largest groups) to every matrix at its least-damage
option (8 bits), from one measurement of the damages (cached with --sensitivity FILE): the
predicted KLD at each size is the sum of the chosen options' damages (nats per token).
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpack.formats.errors import LlmpackError
from llmpack.formats.spec import ALIGN, FORMAT_VERSION, PREFIX_SIZE, READER_FOR_VERSION, align, part_layout

from .plan_structure import Structure
from .quantize import sensitivity
from .quantize.options import is_quantized

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
FORMS = "bytes (126000000), kB/MB/GB (126MB), KiB/MiB/GiB (120MiB) or a ratio to the bf16 source (10x)"
MAX_CRC = 4294967295
WIDEST_SECONDS = 9999999.99  # a timing field as round(seconds, 2) renders at its widest (115 days)
WIDEST_FRACTION = -0.1234567  # a rounded ratio/bits-per-weight/KLD (round(x, 4..6)) at its widest
# header bytes set aside for the --eval report (measured ~450, ~700 across tokenizers) and the last
# recipe step's copy of its figures (~170), each plus the text's name
QUALITY_RESERVE = 1536
FRONTIER_POINTS = 12


@dataclass(frozen=True)
class SizeTarget:
    """A --target-size: absolute bytes, or a ratio against the source's bf16 size; `text` None
    for --plan-only without a target."""

    text: str | None
    nbytes: int | None = None
    ratio: float | None = None

    def resolve(self, bf16_bytes: int) -> int | None:
        if self.ratio is not None:
            return int(bf16_bytes / self.ratio)
        return self.nbytes


def parse_size(text) -> SizeTarget:
    """'126MB', '120MiB', '1.5GB', '126000000', '10x' -> SizeTarget (LlmpackError naming the forms)."""
    if text is None:
        return SizeTarget(None)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m and unit == "x":
        ratio = float(m.group(1))
        if ratio > 0:
            return SizeTarget(str(text).strip(), ratio=ratio)
    elif m and unit in UNITS:
        nbytes = int(float(m.group(1)) * UNITS[unit])
        if nbytes > 0:
            return SizeTarget(str(text).strip(), nbytes=nbytes)
    raise LlmpackError(f"--target-size {text!r}: give a positive size: {FORMS}")


def source_bf16_bytes(ckpt) -> int:
    """2 bytes per parameter of the checkpoint (every tensor it holds): what '10x' divides."""
    return 2 * sum(math.prod(ckpt.shape(n)) for n in ckpt.tensor_names())


def _json_len(obj) -> int:
    return len(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())


class Layout:
    """Bytes every planned tensor adds to the file (aligned parts + directory entry)."""

    def __init__(self, offset_digits: int):
        self.widest_offset = 10 ** offset_digits - 1

    def tensor(self, name: str, type_name: str, shape, group_size=None, zeros: bool = False) -> int:
        layout = part_layout(type_name, tuple(shape), group_size, zeros)
        parts = {p: [self.widest_offset, int(np.dtype(dt).itemsize * math.prod(ps)), MAX_CRC]
                 for p, (dt, ps) in layout.items()}
        entry = {"name": name, "type": type_name, "shape": list(shape), "parts": parts}
        if group_size is not None:
            entry["group_size"] = group_size
        return sum(align(v[1]) for v in parts.values()) + _json_len(entry) + 1  # +1: the list's comma

    def kind(self, name: str, kind, shape, opts) -> int:
        if is_quantized(kind):
            return self.tensor(name, f"q{kind[0]}", shape, kind[1], not opts.sym(kind[0]))
        return self.tensor(name, kind, shape)


def _float_type(name: str, shape, float_dtype: str) -> str:
    """What stream.write / quantize.store give a tensor without a plan entry."""
    return "f32" if len(shape) != 2 or name.startswith("rope.") else float_dtype


def _costs(layout, free, shapes, opts):
    return {n: {c: layout.kind(n, c, shapes[n], opts) for c in sensitivity.candidates(shapes[n], opts)}
            for n in free}


@dataclass
class Plan:
    fixed: int  # bytes that do not depend on the choice (header, non-matrix tensors, kept matrices)
    costs: dict  # name -> {(bits, group): bytes}
    damages: dict  # name -> {(bits, group): predicted KLD contribution}
    weights: int  # elements of all weight matrices (for bits/weight)
    fixed_bits: int  # storage bits of the kept matrices
    reused: bool
    vocab: object = None  # plan_vocab.VocabChoice (None: the vocabulary is not searched)
    shapes: dict | None = None  # tensor shapes under this vocabulary
    tie_damage: float | None = None  # the head tied to the embedding (nats per byte); None: untied
    structure: Structure = Structure()  # blocks dropped / MLP neurons pruned (plan_structure.py)

    def damage(self, choice, scale) -> float:
        """Predicted damage in nats per byte of text: quantization's KL per token over the bytes a
        token spans, plus the vocabulary's and the tying's measured losses (plan_vocab.py)."""
        return (self.kld(choice) / scale.bytes_per_token + (self.vocab.damage if self.vocab is not None else 0.0)
                + (self.tie_damage or 0.0))

    @property
    def smallest(self) -> int:
        return self.fixed + sum(min(c.values()) for c in self.costs.values())

    @property
    def largest(self) -> int:
        """Every matrix at its least-damage option (the most any target can use)."""
        return self.fixed + sum(self.costs[n][min(d, key=lambda o: (d[o], self.costs[n][o]))]
                                for n, d in self.damages.items())

    def solve(self, nbytes: int) -> dict:
        return sensitivity.solve(self.damages, self.costs, nbytes - self.fixed)

    def size(self, choice) -> int:
        return self.fixed + sum(self.costs[n][c] for n, c in choice.items())

    def kld(self, choice) -> float:
        """Predicted KL per token: the chosen options' damages plus the structure's measured one."""
        return sum(self.damages[n][c] for n, c in choice.items()) + self.structure.damage

    def bits_per_weight(self, choice, shapes, opts) -> float:
        bits = self.fixed_bits + sum(sensitivity.tensor_bits(b, shapes[n], g, opts.sym(b))
                                     for n, (b, g) in choice.items())
        return bits / max(self.weights, 1)


def histogram(choice: dict) -> dict:
    counts = {}
    for b, g in sorted(choice.values()):
        counts[f"q{b}g{g}"] = counts.get(f"q{b}g{g}", 0) + 1
    return counts


def _header_bytes(header: dict, opts, record_bound: dict, eval_text_name: str | None, between=()) -> int:
    """The header without its tensor directory, with every field convert.py fills in after
    planning at its widest: the plan and quantize records (quantize's timing; `between`: the
    records of steps that run before it, e.g. the vocabulary trim), bits/weight, the conversion
    time, and the --eval report's reserve."""
    h = json.loads(json.dumps(header))
    h["recipe"] = list(h.get("recipe") or []) + [record_bound, *between,
                                                 {"step": "quantize", **opts.describe(), "seconds": WIDEST_SECONDS}]
    h["provenance"]["seconds"] = WIDEST_SECONDS
    h["provenance"]["options"]["bits_per_weight"] = WIDEST_FRACTION
    h.update(format_version=FORMAT_VERSION, min_reader=READER_FOR_VERSION[FORMAT_VERSION], tensors=[])
    return _json_len(h) + (QUALITY_RESERVE + 2 * _json_len(eval_text_name) if eval_text_name is not None else 0)


def record(target: SizeTarget, target_bytes, plan: Plan, choice: dict, shapes, opts, scale=None) -> dict:
    """The recipe's "plan" step: what was asked, what the allocator chose, what it predicts."""
    rec = {"step": "plan", "target_size": target.text, "target_bytes": target_bytes,
           "planned_bytes": plan.size(choice), "predicted_kld": round(plan.kld(choice), 6),
           "bits_per_weight": round(plan.bits_per_weight(choice, plan.shapes or shapes, opts), 4),
           "types": histogram(choice), "measurement": "reused" if plan.reused else "measured"}
    if plan.vocab is not None:
        rec["vocab"] = plan.vocab.record()
    if scale is not None:
        rec["predicted_bpb_ratio"] = round(1 + plan.damage(choice, scale) / scale.nll_per_byte, 6)
    rec["tie_head"] = ({"damage_nats_per_byte": round(plan.tie_damage, 6)} if plan.tie_damage is not None
                       else False)
    if not plan.structure.none:
        rec["structure"] = plan.structure.record()
    return rec


def make_plans(r, s, recipe, calib_info, header: dict, quiet: bool = False,
               eval_text_name: str = "") -> tuple[list[Plan], object]:
    """Measure (or reuse) the damages; one Plan per vocabulary weighed (the full one first) and
    the per-byte scale that compares them (None when the vocabulary is not searched).

    `r` the convert.Source, `s` the stream (its `types` is the write plan), `header` the header
    as convert.py builds it before the plan (recipe records of earlier steps included)."""
    from . import plan_structure, plan_vocab
    from .steps import tie_head

    opts = recipe.quant
    free = sensitivity.free_tensors(s.types, opts, r.hf_of)
    damages, reused = sensitivity.measured_damages(r.ckpt, r.fam, s.source, r.model, r.shapes, free, opts, s.ids,
                                                   quiet, recipe.sensitivity_file, calib_info)
    trims = [] if recipe.keep_vocab else plan_vocab.trims(r, recipe, recipe.vocab.check_model)
    tie_ok = tie_head.applicable(r.model, r.shapes) and {"embed.weight", "head.weight"} <= set(free)
    vocabs, scale, tie_damage = [None], None, 0.0
    if trims or tie_ok:
        m = plan_vocab.measure(r, recipe, trims, tie_ok, quiet, plan_vocab.cache_path(recipe.sensitivity_file))
        vocabs, scale, tie_damage = m.vocabs, m.scale, m.tie_damage or 0.0
        if recipe.vocab.active:
            vocabs = vocabs[1:]  # --vocab-size / --vocab-from: that vocabulary only
    ties = [True] if recipe.tie_head else [False, True] if tie_ok else [False]
    structures = plan_structure.measure(r, s, recipe, quiet)
    return [_lay_out(r, s, recipe, header, free, damages, reused, v, tie_damage if tie else None, eval_text_name, st)
            for v in vocabs for tie in ties for st in structures], scale


def _variant(r, header: dict, free: list, damages: dict, vocab, tie_damage, structure: Structure, opts):
    """Shapes, tokenizer blob, header, choices and damages of the source under a structure, a
    vocabulary trim and/or a tied head (names as the file numbers its blocks), and the records of
    those steps (they run before quantize)."""
    from .plan_structure import scaled_damages
    from .steps import layer_drop
    from .steps.vocab_trim import VocabTrimStep

    shapes, tok_name, tok_blob, between = dict(r.shapes), r.tokenizer[1], r.tokenizer[2], []
    if not structure.none:
        n = header["model"]["n_layers"]
        shapes = structure.shapes(r.shapes, n)
        damages = scaled_damages(structure, damages, r.shapes, shapes, n, lambda sh: sensitivity.candidates(sh, opts))
        free = list(structure.renamed(dict.fromkeys(free), n))
        kept = structure.kept(n)
        header = dict(header, model=dict(header["model"], layers=[header["model"]["layers"][i] for i in kept],
                                         n_layers=len(kept)))
        if structure.dropped:
            between.append(layer_drop.record([(i, WIDEST_FRACTION) for i, _ in structure.dropped], WIDEST_SECONDS))
        if structure.mlp:
            between.append({"step": "prune", "heads": 0, "mlp": structure.mlp, "removed_kv_groups": 0,
                            "removed_neurons": structure.removed_neurons(r.shapes, n)})
    trim = vocab.trim if vocab is not None else None
    if trim is not None:
        for name in ("embed.weight", "head.weight", "head.bias"):
            if name in shapes:
                shapes[name] = (len(trim.kept),) + tuple(shapes[name][1:])
        tok_blob = trim.blob
        header = dict(header, generation=trim.generation, config=trim.config)
        between = [{"step": "vocab", **VocabTrimStep(trim).options()}]
    if tie_damage is not None:  # one matrix serves both ends: its damage is both roles' (steps/tie_head.py)
        D = shapes["embed.weight"][1]
        del shapes["head.weight"]
        shapes["head_proj.weight"] = (D, D)
        free = [n for n in free if n != "head.weight"]
        head_damages = damages["head.weight"]
        damages = {n: d for n, d in damages.items() if n != "head.weight"}
        damages["embed.weight"] = {c: v + head_damages.get(c, v) for c, v in damages["embed.weight"].items()}
        header = dict(header, model=dict(header["model"], tied_head=True))
        between.append({"step": "tie_head", "residual": WIDEST_FRACTION})
    return shapes, tok_name, tok_blob, header, free, damages, between


def _lay_out(r, s, recipe, header: dict, free: list, damages: dict, reused: bool, vocab, tie_damage,
             eval_text_name, structure: Structure = Structure()) -> Plan:
    """Every byte of the file but the choices', under vocabulary `vocab` (None: as the source),
    with the head tied to the embedding when `tie_damage` is not None (its damage per byte), after
    `structure` (blocks dropped, MLP neurons pruned)."""
    opts = recipe.quant
    n_layers = header["model"]["n_layers"]
    shapes, tok_name, tok_blob, header, free, damages, between = _variant(r, header, free, damages, vocab,
                                                                          tie_damage, structure, opts)
    types = structure.renamed(s.types, n_layers)  # --keep'd matrices, as the file numbers its blocks
    # directory offsets have at most the digits of an upper bound of the data region's end
    all_shapes = list(shapes.values()) + [a.shape for a in r.extra.values()]
    upper = PREFIX_SIZE + align(len(tok_blob)) + sum(align(math.prod(shape) * 4) + 4 * ALIGN for shape in all_shapes)
    layout = Layout(len(str(upper)))  # every tensor at f32 is more than any plan's data region
    fixed = PREFIX_SIZE + layout.tensor(tok_name, "u8", (len(tok_blob),))
    fixed += sum(layout.tensor(n, "f32", a.shape) for n, a in r.extra.items())
    fixed_bits = 0
    for name, shape in shapes.items():
        if name in free:
            continue
        if name in types:
            fixed += layout.kind(name, types[name], shape, opts)
            kind = types[name]
            fixed_bits += (sensitivity.tensor_bits(kind[0], shape, kind[1], opts.sym(kind[0])) if is_quantized(kind)
                           else math.prod(shape) * {"f32": 32, "f16": 16, "bf16": 16}[kind])
        else:
            fixed += layout.tensor(name, _float_type(name, shape, s.float_dtype), shape)
    costs = _costs(layout, free, shapes, opts)
    weights = sum(math.prod(shapes[n]) for n in types if n in shapes)
    plan = Plan(0, costs, damages, weights, fixed_bits, reused, vocab, shapes, tie_damage, structure)
    bound = {"step": "plan", "target_size": opts.target_size.text or "", "target_bytes": upper,
             "planned_bytes": upper, "predicted_kld": WIDEST_FRACTION, "bits_per_weight": WIDEST_FRACTION,
             "types": {f"q{b}g{g}": len(free) for b, g in {c for d in costs.values() for c in d}},
             "measurement": "measured"}
    if vocab is not None:
        bound["vocab"] = {"size": upper, "damage_nats_per_byte": WIDEST_FRACTION}
    bound["predicted_bpb_ratio"] = WIDEST_FRACTION  # recorded whenever the vocabulary or the head was measured
    bound["tie_head"] = {"damage_nats_per_byte": WIDEST_FRACTION} if tie_damage is not None else False
    if not structure.none:
        bound["structure"] = {"dropped": [i for i, _ in structure.dropped], "mlp": structure.mlp,
                              "damage": WIDEST_FRACTION}
    if eval_text_name is not None and recipe.eval_text is not None:
        between = [_probed(b, eval_text_name) for b in between]
    if recipe.heal is not None:  # healing runs after the plan is fixed; its records are set aside
        from .heal.run import record_bounds

        between += record_bounds(recipe.heal, header["model"]["n_layers"], opts.calib_seqlen, WIDEST_SECONDS)
    plan.fixed = fixed + _header_bytes(header, opts, bound, eval_text_name if recipe.eval_text is not None else None,
                                       between)
    return plan


def _probed(rec: dict, eval_text_name: str) -> dict:
    """A step record with the quality figures --eval's probes add after it (step_quality.py), at their widest."""
    from .step_quality import MEASURED_AFTER

    if rec["step"] not in MEASURED_AFTER:
        return rec
    quality = {k: WIDEST_FRACTION for k in ("kld", "top1", "ppl_ratio", "bpb_ratio")}
    quality.update(windows=99999, ctx=9999999, text=eval_text_name, reference="source (converter's float32 blocks)")
    return dict(rec, quality=quality)


def _score(plan: Plan, choice: dict, scale) -> float:
    return plan.damage(choice, scale) if scale is not None else plan.kld(choice)


def choose(plans: list, scale, target: SizeTarget, target_bytes: int, quiet: bool = False) -> tuple[Plan, dict]:
    """The plan (vocabulary) and choice of least predicted damage that fit `target_bytes`; a
    one-line error below the smallest reachable file."""
    reachable = [p for p in plans if target_bytes >= p.smallest]
    if not reachable:
        low = min(plans, key=lambda p: p.smallest)
        how = "every matrix at 2 bits, largest groups" + (
            f", the vocabulary trimmed to {low.vocab.size:,} tokens" if low.vocab is not None and low.vocab.size else "") + (
            "" if low.structure.none else f", structure {low.structure.label()}")
        raise LlmpackError(f"--target-size {target.text} ({target_bytes:,} bytes) is below the smallest reachable "
                           f"file, {low.smallest:,} bytes ({_mb(low.smallest)}: {how}); raise the target")
    best = None
    for p in reachable:
        choice = p.solve(target_bytes)
        # equal damage (a block that is the identity, dead neurons): the smaller file
        if best is None or (_score(p, choice, scale), p.size(choice)) < (_score(*best, scale), best[0].size(best[1])):
            best = (p, choice)
    if target_bytes >= best[0].largest and not quiet:
        print(f"plan: --target-size {target.text} ({target_bytes:,} bytes) is at or above the largest useful file "
              f"({best[0].largest:,} bytes, every matrix at its least-damage option); writing that", file=sys.stderr)
    return best


def frontier(plans: list, scale, opts, points: int = FRONTIER_POINTS) -> list[dict]:
    """Size against predicted damage from the smallest reachable file to the largest useful one,
    geometrically spaced; each point the best vocabulary and choice that fit (a smaller point's
    when it predicts less damage: the allocation is a heuristic, the frontier must not rise)."""
    lo, hi = min(p.smallest for p in plans), max(p.largest for p in plans)
    sizes = sorted({int(round(x)) for x in np.geomspace(lo, max(hi, lo + 1), points)})
    rows, best = [], None
    for nbytes in sizes:
        plan, choice = choose(plans, scale, SizeTarget(str(nbytes), nbytes), nbytes, quiet=True)
        if best is not None and _score(*best, scale) <= _score(plan, choice, scale):
            plan, choice = best
        best = (plan, choice)
        row = {"target_bytes": nbytes, "planned_bytes": plan.size(choice), "predicted_kld": plan.kld(choice),
               "bits_per_weight": plan.bits_per_weight(choice, plan.shapes, opts), "types": histogram(choice),
               "structure": plan.structure.label()}
        if scale is not None:
            row.update(vocab=plan.vocab.size if plan.vocab is not None else None, tied=plan.tie_damage is not None,
                       predicted_bpb_ratio=1 + plan.damage(choice, scale) / scale.nll_per_byte)
        rows.append(row)
    return rows


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def print_frontier(rows: list[dict], bf16_bytes: int, file=None):
    """One row per size: target and planned bytes, MB, ratio to bf16, bits/weight, predicted KLD
    (and, when the vocabulary is searched, its size and the predicted bits-per-byte ratio), types."""
    file = file or sys.stdout
    vocab = any("vocab" in r for r in rows)
    print(f"{'target bytes':>14} {'planned bytes':>14} {'MB':>9} {'x bf16':>7} {'bits/w':>7} {'pred. KLD':>10}"
          + (f" {'vocab':>11} {'pred. bpb':>9}" if vocab else "") + f" {'structure':>12}  types", file=file)
    for r in rows:
        extra = ""
        if vocab:
            v = f"{'full' if r['vocab'] is None else r['vocab']}{'+tie' if r.get('tied') else ''}"
            extra = f" {v:>11} {r['predicted_bpb_ratio']:>8.4f}x"
        print(f"{r['target_bytes']:>14,d} {r['planned_bytes']:>14,d} {r['planned_bytes'] / 1e6:>9.3f} "
              f"{bf16_bytes / r['planned_bytes']:>6.2f}x {r['bits_per_weight']:>7.3f} {r['predicted_kld']:>10.4g}"
              + extra + f" {r.get('structure', 'whole'):>12}  " + " ".join(f"{k}:{v}" for k, v in r["types"].items()),
              file=file)


def write_png(rows: list[dict], path, title: str) -> str | None:
    """The frontier as a PNG (matplotlib's Agg backend); None (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["planned_bytes"] / 1e6 for r in rows], [r["predicted_kld"] for r in rows], "o-")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("predicted KLD (nats/token)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plan_only(plans: list, scale, r, recipe, out, target_bytes, quiet: bool = False) -> dict:
    """--plan-only: the frontier table on stdout and a PNG next to OUT; no pack."""
    bf16 = source_bf16_bytes(r.ckpt)
    rows = frontier(plans, scale, recipe.quant)
    print_frontier(rows, bf16)
    result = {"frontier": rows, "smallest_bytes": min(p.smallest for p in plans),
              "largest_bytes": max(p.largest for p in plans), "source_bf16_bytes": bf16, "png": None}
    if target_bytes is not None:
        plan, choice = choose(plans, scale, recipe.quant.target_size, target_bytes, quiet=quiet)
        result["plan"] = record(recipe.quant.target_size, target_bytes, plan, choice, r.shapes, recipe.quant, scale)
        print(f"plan for --target-size {recipe.quant.target_size.text}: {result['plan']['planned_bytes']:,} bytes, "
              f"predicted KLD {result['plan']['predicted_kld']:.5f}, " + " ".join(
                  f"{k}:{v}" for k, v in result["plan"]["types"].items()))
    png = Path(out).with_suffix(".plan.png")
    result["png"] = write_png(rows, png, f"{Path(str(r.ckpt.dir)).name}: predicted KLD vs size")
    if not quiet:
        print(f"plan: frontier plot {png}" if result["png"] else "plan: matplotlib is not installed; no PNG written",
              file=sys.stderr)
    return result


def run(r, s, recipe, calib_info, header: dict, out, eval_text_name,
        quiet: bool = False) -> tuple[dict, object, bool, Structure]:
    """convert.py's planning step: with --plan-only the frontier (returned; no pack), else the
    choice for --target-size written into the stream's plan (`s.types`, named as the file numbers
    its blocks), its recipe record, the vocabulary trim it chose (tokenizer_trim.TrimPlan, or None
    for the full vocabulary), whether it ties the head, and the structure convert.py applies."""
    target = recipe.quant.target_size
    if recipe.plan_only and not Path(out).parent.is_dir():  # before the measurement, not after
        raise LlmpackError(f"output folder {Path(out).parent} does not exist (the plot goes there); create it first")
    plans, scale = make_plans(r, s, recipe, calib_info, header, quiet, eval_text_name)
    target_bytes = target.resolve(source_bf16_bytes(r.ckpt)) if target.text is not None else None
    if recipe.plan_only:
        return plan_only(plans, scale, r, recipe, out, target_bytes, quiet), None, False, Structure()
    plan, choice = choose(plans, scale, target, target_bytes, quiet)
    renamed = plan.structure.renamed(s.types, r.model["n_layers"])
    s.types.clear()
    s.types.update(renamed)
    s.types.update(choice)
    rec = record(target, target_bytes, plan, choice, r.shapes, recipe.quant, scale)
    if not quiet:
        vocab = "" if scale is None else (
            f"vocabulary {'full' if plan.vocab is None or plan.vocab.size is None else f'{plan.vocab.size:,} tokens'}"
            f"{', head tied' if plan.tie_damage is not None else ''}, predicted bits/byte ratio "
            f"{rec['predicted_bpb_ratio']:.4f}; ")
        st = "" if plan.structure.none else f"structure {plan.structure.label()}; "
        print(f"plan: {target.text} = {target_bytes:,} bytes; planned {rec['planned_bytes']:,} bytes, "
              f"{rec['bits_per_weight']:.3f} bits/weight, predicted KLD {rec['predicted_kld']:.5f}; {vocab}{st}"
              + " ".join(f"{k}:{v}" for k, v in rec["types"].items()), file=sys.stderr)
    return rec, plan.vocab.trim if plan.vocab is not None else None, plan.tie_damage is not None, plan.structure


def check_written(out, header: dict, quiet: bool = False):
    """The written file against its plan: never over the target (the plan is an upper bound; a
    file over it is removed and reported as the planner's error), and predicted against measured
    KLD when --eval measured it."""
    rec = next(x for x in header["recipe"] if x.get("step") == "plan")
    size = Path(out).stat().st_size
    if size > rec["target_bytes"]:
        Path(out).unlink()
        raise LlmpackError(f"planner error: the file came out at {size:,} bytes, over --target-size "
                           f"{rec['target_size']} ({rec['target_bytes']:,} bytes, planned {rec['planned_bytes']:,}); "
                           f"nothing written; please report it")
    if quiet:
        return
    print(f"plan: wrote {size:,} bytes = {100 * size / rec['target_bytes']:.2f} % of the target "
          f"({rec['target_bytes']:,} bytes; planned upper bound {rec['planned_bytes']:,})", file=sys.stderr)
    for q in header.get("quality") or []:
        if isinstance(q.get("bpb_ratio"), (int, float)) and rec.get("predicted_bpb_ratio"):
            print(f"plan: predicted bits/byte ratio {rec['predicted_bpb_ratio']:.4f}, measured {q['bpb_ratio']:.4f}",
                  file=sys.stderr)
        if isinstance(q.get("kld"), (int, float)) and rec["predicted_kld"] > 0:
            print(f"plan: predicted KLD {rec['predicted_kld']:.5f}, measured {q['kld']:.5f} "
                  f"(measured/predicted {q['kld'] / rec['predicted_kld']:.2f})", file=sys.stderr)
