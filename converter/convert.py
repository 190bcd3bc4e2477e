"""Checkpoint folder -> one .llmpack file: a recipe of steps over a stream of blocks.

`convert()` reads the checkpoint's plan (names, shapes, description), prepares what the
recipe needs (calibration tokens, a layer-drop plan, a bit allocation), then streams the
model block by block through the recipe's steps (converter/stream.py) into the writer, and
finally measures the file against its source when asked.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmpack.formats import __version__
from llmpack.formats.blocks import describe_model
from llmpack.formats.errors import LlmpackError
from llmpack.formats.writer import PackWriter

from . import stream as stream_mod
from . import checks, step_quality, tokenizer_files
from .checkpoint import Checkpoint
from .describe import describe, family_for, load_config
from .quantize import calib as calib_mod
from .quantize.options import plan_types
from .quantize.step import QuantizeStep
from .recipe import DTYPES, Recipe  # noqa: F401  (DTYPES: the CLI's and tests' list)
from .source import TensorSource, canonical_shapes, order_key, plan_names
from .steps import layer_drop, pruning, slicing, tie_head, vocab_trim


@dataclass
class Source:
    """What reading the checkpoint yields: the plan of every tensor, before any is loaded."""

    ckpt: Checkpoint
    family: str
    fam: object  # arch.Family
    model: dict  # the header's model description (steps edit it)
    extra: dict  # tensors the converter computes (RoPE tables)
    plan: list  # (hf name, canonical name, rewrite)
    shapes: dict  # canonical name -> shape
    hf_of: dict  # canonical name -> hf name
    tokenizer: tuple  # (section, blob name, blob bytes)


def read(src, recipe: Recipe) -> Source:
    """The checkpoint's description, tensor plan and tokenizer; refuses what cannot run."""
    ckpt = Checkpoint(src)
    mt, fam = family_for(ckpt.config_dict)
    cfg = load_config(ckpt)
    tok = tokenizer_files.collect(ckpt)
    checks.check_tokenizer(ckpt, tok[0], tok[2], _generation(ckpt))
    plan = plan_names(ckpt, fam, mt)
    model, extra = describe(mt, fam, cfg, any(c == "head.weight" for _, c, _ in plan))
    if model["tied_head"]:
        plan = [p for p in plan if not p[1].startswith("head.weight")]
    plan.sort(key=lambda p: order_key(p[1]))
    checks.check_layers(model, {c for _, c, _ in plan})
    _check_complete(model, fam, {c for _, c, _ in plan})
    shapes, hf_of = canonical_shapes(ckpt, plan)
    checks.check_shapes(model, shapes, hf_of)
    recipe.structure.check_model(model, shapes, mt)
    if recipe.tie_head:
        tie_head.check_model(model, shapes)
    return Source(ckpt, mt, fam, model, extra, plan, shapes, hf_of, tok)


def convert(src, out, quiet: bool = False, recipe: Recipe | None = None, **options) -> dict:
    """Convert; returns the written header. Raises LlmpackError on bad input (nothing written).

    Options (see Recipe.from_options): dtype f32/f16/bf16 (q8 = bits 8, RTN); `bits` (8/4/3/2)
    for every weight matrix (embedding and head row-wise), `method` rtn / gptq / awq /
    awq+gptq, `keep` ["PATTERN=BITS", ...], `target_bpw` per-tensor bits from measured
    sensitivity (kept in / reused from `sensitivity_file`); structure: `slice` (SliceGPT
    fraction of the hidden size), `prune_heads`, `prune_mlp`, `drop_layers`; `eval_text` (a
    file) measures the result against the source and stores the report. `target_size` ('126MB',
    '10x') plans the bits for a file size (converter/plan.py); with `plan_only` the frontier is
    returned and no pack is written.
    """
    recipe = recipe or Recipe.from_options(**options)
    opts = recipe.quant
    if recipe.calibrated:
        calib_mod.check_file(opts.calib)
    eval_src = None
    if recipe.eval_text is not None:
        from llmpack.runtime.quality import check_windows, read_text

        check_windows(recipe.eval_windows, recipe.eval_ctx, ("--eval-windows", "--eval-ctx"))  # before converting
        eval_src = read_text(recipe.eval_text)
    t0 = time.time()
    r = read(src, recipe)
    source_tokenizer = r.tokenizer
    trim = _trim_vocabulary(r, recipe) if recipe.vocab.active and opts.target_size is None else None
    types = plan_types(opts, r.shapes, r.hf_of, recipe.dtype) if (opts.quantized or opts.keep) else {}
    ids, calib_info = _calibration(recipe, r.tokenizer)
    if trim is not None and ids is not None:
        ids = trim.kept[ids]  # the trimmed tokenizer's tokens in the checkpoint's ids (renumbered by the step)
    s = stream_mod.Stream(source=TensorSource(r.ckpt, r.plan, r.model["n_layers"]), model=r.model,
                          spec=describe_model(r.model, {**r.shapes, **{k: v.shape for k, v in r.extra.items()}}),
                          ids=ids, types=types, opts=opts, float_dtype=recipe.dtype,
                          layers=list(range(r.model["n_layers"])),
                          inv_freq={k.split(".")[1]: v for k, v in r.extra.items() if k.startswith("rope.")})
    allocation = _allocate(r, s, recipe, calib_info, quiet) if opts.target_bpw is not None else None
    planned, planned_done = None, []
    if opts.target_size is not None:  # --target-size / --plan-only (converter/plan.py)
        planned, trim, planned_done = _plan(r, s, recipe, calib_info, out, eval_src, quiet)
        if recipe.plan_only:
            return planned
        ids = s.ids
    steps, done = _steps(recipe, s, quiet)
    if trim is not None:
        steps.insert(0, vocab_trim.VocabTrimStep(trim))
    done = planned_done + done
    header = _header(r, recipe, calib_info, done, allocation)
    if trim is not None:
        header.update(generation=trim.generation, config=trim.config)
    evaluator = _evaluator(src, recipe, eval_src, quiet, source_tokenizer) if eval_src is not None else None
    healing = None
    if recipe.heal is not None:
        from .heal.run import Healing

        healing = Healing(recipe.heal, out, Healing.key(header, _options_record(recipe), ids), quiet,
                          trim.new_of_old if trim is not None else None)
        steps = healing.wrap(steps)
    probes = None
    if evaluator is not None and trim is None:  # a trimmed vocabulary is compared file to file only
        probes = _step_probes(source_tokenizer, eval_src, recipe, quiet)
        steps = probes.insert(steps, done)
    if healing is None or not healing.stream_done():
        target = healing.stage1 if healing is not None else out
        _write(target, r, s, steps, header, t0, evaluator if healing is None or not healing.e2e else None, quiet,
               probes)
        if healing is not None:
            healing.after_stream()
    if healing is not None:  # the student's calibration ids (a trimmed vocabulary renumbers them)
        healing.finish(trim.new_of_old[ids] if trim is not None else ids, evaluator)
    if not quiet:
        print(f"convert: wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s",
              file=sys.stderr)
    header = _read_header(out)
    if planned:
        from .plan import check_written

        check_written(out, header, quiet)
    return header


def _write(target, r: Source, s, steps: list, header: dict, t0: float, amend, quiet: bool, probes=None):
    """Stream the model through the steps into `target`; the steps' records go into the header
    (with `probes`, a step_quality.StepQuality, each step's quality after it)."""
    done = header["recipe"]
    with PackWriter(target) as w:
        for name, arr in r.extra.items():
            w.add_array(name, arr, "f32")
        t1 = time.time()
        stream_mod.run(s, steps, w, quiet=quiet)
        recorded = [step for step in steps if step.recorded]
        done += [{"step": step.name, **step.options()} for step in recorded]
        if recorded:  # the stream runs its steps together: its time goes to the record of the last
            done[-1].setdefault("seconds", round(time.time() - t1, 2))
        if probes is not None:
            probes.attach(s, done)
        w.add_blob(r.tokenizer[1], r.tokenizer[2])
        header["model"]["n_layers"] = len(header["model"]["layers"])
        options = header["provenance"]["options"]
        if s.opts.quantized:
            options["bits_per_weight"] = round(_bits_per_weight(w), 4)
        header["provenance"]["seconds"] = round(time.time() - t0, 2)
        w.finish(header, amend=amend)


def _options_record(recipe: Recipe) -> dict:
    return {"dtype": recipe.dtype, "quant": recipe.quant.describe(), "structure": recipe.structure.describe(),
            "heal": recipe.heal.describe() if recipe.heal is not None else None,
            "vocab": [recipe.vocab.size, recipe.vocab.corpus]}


def _trim_vocabulary(r: Source, recipe: Recipe):
    """--vocab-size / --vocab-from: the kept tokens and the trimmed tokenizer (r.tokenizer is replaced)."""
    from . import tokenizer_trim

    texts, corpus = recipe.vocab.texts()
    trim = tokenizer_trim.plan(r.tokenizer, _generation(r.ckpt), r.ckpt.config_dict, r.shapes["embed.weight"][0],
                               recipe.vocab.size, texts, corpus, check=recipe.vocab.check_model)
    r.tokenizer = (r.tokenizer[0], r.tokenizer[1], trim.blob)
    return trim


def _allocate(r: Source, s, recipe: Recipe, calib_info, quiet: bool) -> dict:
    """--target-bpw: per-tensor bits from the measured sensitivity; updates the stream's plan."""
    from .quantize import sensitivity

    opts = recipe.quant
    sensitivity.check_budget(opts, s.types, r.shapes, r.hf_of)
    allocation = sensitivity.allocate(r.ckpt, r.fam, s.source, r.model, r.shapes, s.types, r.hf_of, opts, s.ids,
                                      quiet=quiet, cache=recipe.sensitivity_file, calib_info=calib_info)
    s.types.update(allocation["types"])
    return allocation


def _plan(r: Source, s, recipe: Recipe, calib_info, out, eval_src, quiet: bool) -> tuple[dict, object, list]:
    """--target-size / --plan-only: (the plan record, or the frontier with --plan-only; the
    vocabulary trim chosen, or None; the records of the plan and of what it applied before the
    stream). The choices go into `s` (types, blocks, calibration ids), `r` (tokenizer) and
    `recipe` (tied head, MLP pruning)."""
    from . import plan

    planned, trim, recipe.tie_head, structure = plan.run(r, s, recipe, calib_info,
                                                         _header(r, recipe, calib_info, [], None), out,
                                                         eval_src[1] if eval_src is not None else None, quiet)
    if recipe.plan_only:
        return planned, None, []
    done = [planned] + _planned_structure(s, recipe, structure)
    if trim is not None:  # the planner trimmed the vocabulary: calibrate on the trimmed tokenizer's tokens
        r.tokenizer = (r.tokenizer[0], r.tokenizer[1], trim.blob)
        s.ids = trim.kept[_calibration(recipe, r.tokenizer)[0]]
    return planned, trim, done


def _planned_structure(s, recipe: Recipe, structure) -> list:
    """Apply the planner's structure (plan_structure.Structure): its blocks dropped now (the
    choice measured while planning), its MLP pruning as the stream's prune step; returns the
    layer dropping's record."""
    if structure.mlp:
        recipe.structure.prune_mlp = structure.mlp
    if not structure.dropped:
        return []
    layer_drop.apply(s, structure.kept(len(s.model["layers"])))
    return [layer_drop.record(structure.dropped, 0.0)]


def _header(r: Source, recipe: Recipe, calib_info, done: list, allocation) -> dict:
    opts = recipe.quant
    options = {"dtype": recipe.dtype, "group_size": opts.group_size if opts.quantized else None}
    if opts.quantized:
        options.update(opts.describe(), calibration=calib_info)
    header = {
        "model": r.model,
        "config": r.ckpt.config_dict,
        "tokenizer": r.tokenizer[0],
        "generation": _generation(r.ckpt),
        "provenance": {
            "converter": __version__,
            "source": r.ckpt.sha256_files(),
            "source_dtypes": sorted(r.ckpt.dtypes()),
            "options": options,
        },
        "recipe": done,
        "quality": [],
    }
    if allocation is not None:
        header["provenance"]["allocation"] = allocation["summary"]
    return header


def _calibration(recipe: Recipe, tokenizer: tuple):
    """Calibration tokens (B, T) and their record, when any step calibrates."""
    if not recipe.calibrated:
        return None, None
    tok_section, _, tok_blob = tokenizer
    from llmpack.runtime.tokenizer import Tokenizer

    opts = recipe.quant
    text, text_name = calib_mod.read_text(opts.calib)
    ids = calib_mod.samples(Tokenizer(tok_section, tok_blob), text, opts.calib_samples, opts.calib_seqlen, opts.seed)
    return ids, {"text": text_name, "sha256": calib_mod.text_hash(text), "samples": int(ids.shape[0]),
                 "seqlen": int(ids.shape[1])}


def _steps(recipe: Recipe, s, quiet: bool) -> tuple[list, list]:
    """The stream's steps in recipe order, and the record of steps already run before it."""
    st, done, steps = recipe.structure, [], []
    if st.drop_layers is not None:
        t = time.time()
        dropped = layer_drop.drop_layers(s, st.drop_layers, quiet=quiet)
        done.append(layer_drop.record(dropped, round(time.time() - t, 2)))
    if st.slice is not None:
        steps.append(slicing.SliceStep(st.slice))
    if st.prune_heads is not None or st.prune_mlp is not None:
        steps.append(pruning.PruneStep(heads=st.prune_heads or 0, mlp=st.prune_mlp or 0))
    if recipe.tie_head:
        steps.append(tie_head.TieHeadStep())
    if recipe.quant.calibrated or (recipe.quant.quantized and recipe.heal is not None):
        steps.append(QuantizeStep(recipe.quant))  # healing trains on the quantized parts this step makes
    elif recipe.quant.quantized:
        steps.append(stream_mod.WriteTimeStep("quantize", recipe.quant.describe()))  # RTN as each tensor is written
    return steps, done


def _step_probes(source_tokenizer: tuple, eval_src: tuple, recipe: Recipe, quiet: bool):
    """Probes that measure the model after each step on the evaluation windows (step_quality.py)."""
    from llmpack.runtime.quality import token_windows
    from llmpack.runtime.tokenizer import Tokenizer

    text, name = eval_src
    windows = token_windows(Tokenizer(source_tokenizer[0], source_tokenizer[2]), text, recipe.eval_windows,
                            recipe.eval_ctx)
    return step_quality.StepQuality(windows, name, quiet)


def _evaluator(src, recipe: Recipe, eval_src, quiet: bool, source_tokenizer: tuple):
    def amend(tmp_path):
        from llmpack.runtime.quality import evaluate_files
        from llmpack.runtime.tokenizer import Tokenizer

        from .reference import hf_logits_fn

        options = _read_header(tmp_path)["provenance"]["options"]
        report = evaluate_files(tmp_path, hf_logits_fn(src, quiet), eval_src, windows=recipe.eval_windows,
                                ctx=recipe.eval_ctx, quiet=quiet,
                                ref_tokenizer=Tokenizer(source_tokenizer[0], source_tokenizer[2]))
        opts = recipe.quant
        report.update(reference="source", method=opts.method if opts.quantized else None, bits=opts.bits,
                      group_size=options["group_size"], bits_per_weight=options.get("bits_per_weight"),
                      structure=recipe.structure.describe() or None)
        steps = _read_header(tmp_path)["recipe"]
        if steps:  # the last step's quality is the finished file's
            steps[-1]["quality"] = step_quality.summary(report, windows=report.get("windows"), ctx=report.get("ctx"),
                                                        text=report.get("text"), reference="source (transformers)")
        return {"quality": [report], "recipe": steps}
    return amend


def _read_header(path) -> dict:
    from llmpack.formats.reader import Pack

    p = Pack(path, verify=False)
    try:
        return p.header
    finally:
        p.close()


def _bits_per_weight(writer) -> float:
    """Average storage bits per element of the weight matrices as written (scales and zero points
    counted): the embedding, the head and every block's linears."""
    from .quantize.options import QUANTIZABLE

    total = elems = 0
    for t in writer.tensors:
        if QUANTIZABLE.fullmatch(t["name"]) or t["name"].endswith(".shortcut.weight"):
            total += 8 * sum(n for _off, n, _crc in t["parts"].values())
            elems += t["shape"][0] * t["shape"][1]
    return total / max(elems, 1)


def _generation(ckpt) -> dict:
    return {k: v for k, v in ckpt.json_file("generation_config.json").items() if k != "transformers_version"}


def _check_complete(model: dict, fam, present: set[str]):
    """Refuse a checkpoint that lacks a tensor the runtime will need, naming it."""
    need = {"embed.weight", "final_norm.weight"}
    if not model["tied_head"]:
        need.add("head.weight")
    if fam.learned_pos:
        need.add("pos_embed.weight")
    for i in range(model["n_layers"]):
        p = f"layers.{i}."
        need |= {p + "attn_norm.weight", p + "attn.o.weight", p + "mlp.up.weight", p + "mlp.down.weight"}
        if not fam.parallel_block:
            need.add(p + "mlp_norm.weight")
        if fam.gated_mlp:
            need.add(p + "mlp.gate.weight")
        need |= {p + "attn.q.weight", p + "attn.k.weight", p + "attn.v.weight"}
    # GPT-2's fused qkv arrives under one planned name that expands at write time.
    present = present | {n.replace("{q,k,v}", x) for n in present if "{q,k,v}" in n for x in "qkv"}
    missing = sorted(need - present)
    if missing:
        raise LlmpackError(f"checkpoint lacks tensor {missing[0]} (and {len(missing) - 1} more); "
                           f"is the folder complete?")
