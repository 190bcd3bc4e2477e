"""Checkpoint folder -> one .llmpack file, streaming one tensor at a time."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

from llmpack.formats.errors import LlmpackError
from llmpack.formats.writer import PackWriter
from llmpack.runtime.progress import Progress

from llmpack.formats import __version__

from . import tokenizer_files
from .arch import map_name
from .checkpoint import Checkpoint
from .describe import describe, family_for, load_config
from .quantize import calib as calib_mod
from .quantize import pipeline
from .quantize.options import QuantOptions, kind_bits, plan_types

DTYPES = ("f32", "f16", "bf16", "q8")


def _apply_rewrite(name: str, arr: np.ndarray, rewrite: str | None) -> list[tuple[str, np.ndarray]]:
    if rewrite is None:
        return [(name, arr)]
    if rewrite == "plus1":
        return [(name, arr + np.float32(1.0))]
    if rewrite == "T":
        return [(name, np.ascontiguousarray(arr.T) if arr.ndim == 2 else arr)]
    if rewrite == "opt_pos":
        return [(name, arr[2:])]
    if rewrite == "qkv":  # GPT-2 Conv1D c_attn: weight (D, 3D) -> q, k, v each (D, D)
        arr = arr.T if arr.ndim == 2 else arr
        return [(name.replace("{q,k,v}", x), np.ascontiguousarray(part))
                for x, part in zip("qkv", np.split(arr, 3, axis=0))]
    raise AssertionError(rewrite)


def _order_key(name: str):
    # embed first, then layers in order, then the final norm and head: sequential reads at runtime.
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith(("embed", "pos_embed", "rope")) else 2, 0, name)


class TensorSource:
    """The checkpoint's tensors under canonical names, read (and rewritten) group by group:
    `pre` (embeddings), `layers[i]`, `post` (final norm, head) — lists of plan entries."""

    def __init__(self, ckpt, plan, n_layers):
        self.ckpt = ckpt
        self.pre, self.post = [], []
        self.layers = [[] for _ in range(n_layers)]
        for entry in plan:
            m = re.match(r"layers\.(\d+)\.", entry[1])
            if m:
                self.layers[int(m.group(1))].append(entry)
            elif entry[1].startswith(("embed", "pos_embed")):
                self.pre.append(entry)
            else:
                self.post.append(entry)

    def load(self, entries) -> dict[str, np.ndarray]:
        out = {}
        for hf, canon, rewrite in entries:
            out.update(_apply_rewrite(canon, self.ckpt.get(hf), rewrite))
        return out


def _canonical_shapes(ckpt, plan) -> tuple[dict, dict]:
    """Canonical name -> shape (from the safetensors headers, nothing loaded), and -> HF name."""
    shapes, hf_of = {}, {}
    for hf, canon, rewrite in plan:
        shape = ckpt.shape(hf)
        if rewrite == "T" and len(shape) == 2:
            shape = shape[::-1]
        elif rewrite == "opt_pos":
            shape = (shape[0] - 2,) + shape[1:]
        if rewrite == "qkv":
            part = (shape[1] // 3, shape[0]) if len(shape) == 2 else (shape[0] // 3,)
            for x in "qkv":
                shapes[canon.replace("{q,k,v}", x)] = part
                hf_of[canon.replace("{q,k,v}", x)] = hf
        else:
            shapes[canon] = shape
            hf_of[canon] = hf
    return shapes, hf_of


def convert(src, out, dtype: str = "f16", group_size: int | None = None, quiet: bool = False,
            bits: int | None = None, method: str = "rtn", keep=(), target_bpw: float | None = None,
            calib=None, calib_samples: int = 16, calib_seqlen: int = 512, seed: int = 0,
            symmetric: bool | None = None, act_order: bool = True, damp: float = 0.01,
            eval_text=None, eval_windows: int = 16, eval_ctx: int = 512, sensitivity_file=None) -> dict:
    """Convert; returns the written header. Raises LlmpackError on bad input (nothing written).

    Plain: dtype f32/f16/bf16 (q8 = bits 8, RTN). Quantized: `bits` (8/4/3/2) for every weight
    matrix (embedding and head row-wise), `method` rtn / gptq / awq (AWQ scales + RTN) /
    awq+gptq, `keep` ["PATTERN=BITS", ...] per-tensor overrides, `target_bpw` picks per-tensor
    bits from measured sensitivity (kept in / reused from `sensitivity_file` if given).
    `eval_text` (a file) measures the result against the source and stores the report in the
    header's "quality" list.
    """
    if dtype not in DTYPES:
        raise LlmpackError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "q8":
        if bits not in (None, 8):
            raise LlmpackError(f"--dtype q8 contradicts --bits {bits}; give only --bits")
        bits, dtype = 8, "f16"
    opts = QuantOptions(bits=bits, group_size=group_size or 32, group_explicit=group_size is not None,
                        method=method, symmetric=symmetric,
                        keep=list(keep or ()), target_bpw=target_bpw, calib=None if calib is None else str(calib),
                        calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
                        act_order=act_order, damp=damp)
    opts.validate()
    if sensitivity_file is not None:
        if target_bpw is None:
            raise LlmpackError("--sensitivity only applies with --target-bpw; add --target-bpw X or drop it")
        if not Path(sensitivity_file).parent.is_dir():
            raise LlmpackError(f"--sensitivity {sensitivity_file}: no such folder {Path(sensitivity_file).parent}")
    if opts.calibrated:
        calib_mod.check_file(calib)
    eval_src = None
    if eval_text is not None:
        from llmpack.runtime.quality import check_windows, read_text

        check_windows(eval_windows, eval_ctx, ("--eval-windows", "--eval-ctx"))  # now, not after converting
        eval_src = read_text(eval_text)
    t0 = time.time()
    ckpt = Checkpoint(src)
    mt, fam = family_for(ckpt.config_dict)
    cfg = load_config(ckpt)
    tok_section, tok_blob_name, tok_blob = tokenizer_files.collect(ckpt)
    names = ckpt.tensor_names()

    plan = []  # (hf name, canonical name, rewrite)
    for hf in names:
        try:
            canon, rewrite = map_name(fam, hf)
        except KeyError:
            raise LlmpackError(f"tensor {hf!r} of this {mt} checkpoint is not mapped by llmpack; "
                               f"the checkpoint has parts llmpack does not know how to run")
        if canon is not None:
            plan.append((hf, canon, rewrite))
    has_head = any(c == "head.weight" for _, c, _ in plan)
    model, extra = describe(mt, fam, cfg, has_head)
    if model["tied_head"]:
        plan = [p for p in plan if not p[1].startswith("head.weight")]
    plan.sort(key=lambda p: _order_key(p[1]))
    _check_complete(model, fam, {c for _, c, _ in plan})

    shapes, hf_of = _canonical_shapes(ckpt, plan)
    types = plan_types(opts, shapes, hf_of, dtype) if (opts.quantized or opts.keep) else {}
    if opts.target_bpw is not None:
        from .quantize import sensitivity

        sensitivity.check_budget(opts, types, shapes, hf_of)

    ids = tokenizer = None
    calib_info = None
    if opts.calibrated:
        from llmpack.runtime.tokenizer import Tokenizer

        tokenizer = Tokenizer(tok_section, tok_blob)
        text, text_name = calib_mod.read_text(calib)
        ids = calib_mod.samples(tokenizer, text, opts.calib_samples, opts.calib_seqlen, opts.seed)
        calib_info = {"text": text_name, "sha256": calib_mod.text_hash(text), "samples": int(ids.shape[0]),
                      "seqlen": int(ids.shape[1])}
    source = TensorSource(ckpt, plan, model["n_layers"])
    allocation = None
    if opts.target_bpw is not None:
        from .quantize import sensitivity

        allocation = sensitivity.allocate(ckpt, fam, source, model, shapes, types, hf_of, opts, ids, quiet=quiet,
                                          cache=sensitivity_file, calib_info=calib_info)
        types.update(allocation["types"])

    options = {"dtype": dtype, "group_size": opts.group_size if opts.quantized else None}
    if opts.quantized:
        options.update(opts.describe(), calibration=calib_info)
        options["bits_per_weight"] = round(_bits_per_weight(types, shapes, opts), 4)
    header = {
        "model": model,
        "config": ckpt.config_dict,
        "tokenizer": tok_section,
        "generation": {k: v for k, v in ckpt.json_file("generation_config.json").items()
                       if k != "transformers_version"},
        "provenance": {
            "converter": __version__,
            "source": ckpt.sha256_files(),
            "source_dtypes": sorted(ckpt.dtypes()),
            "options": options,
        },
        "quality": [],
    }
    if allocation is not None:
        header["provenance"]["allocation"] = allocation["summary"]
    with PackWriter(out) as w:
        for name, arr in extra.items():
            w.add_array(name, arr, "f32")
        if opts.calibrated:
            inv_freq = {k.split(".")[1]: v for k, v in extra.items() if k.startswith("rope.")}
            pipeline.run(w, source, model, inv_freq, types, opts, ids, dtype, quiet=quiet)
        else:
            sizes = {hf: int(np.prod(ckpt.shape(hf))) for hf, _, _ in plan}  # ETA by weights, not tensors
            total = sum(sizes.values())
            progress = Progress("convert", total, quiet=quiet, unit="G weights" if total >= 1e9 else "M weights",
                                scale=1e9 if total >= 1e9 else 1e6)
            for hf, canon, rewrite in plan:
                for name, arr in _apply_rewrite(canon, ckpt.get(hf), rewrite):
                    pipeline.store(w, name, arr, types, opts, dtype)
                progress.step(canon, n=sizes[hf])
            progress.done()
        w.add_blob(tok_blob_name, tok_blob)
        header["provenance"]["seconds"] = round(time.time() - t0, 2)

        def amend(tmp_path):
            from llmpack.runtime.quality import evaluate_files

            from .reference import hf_logits_fn

            report = evaluate_files(tmp_path, hf_logits_fn(src, quiet), eval_src, windows=eval_windows,
                                    ctx=eval_ctx, quiet=quiet)
            report.update(reference="source", method=opts.method if opts.quantized else None, bits=opts.bits,
                          group_size=options["group_size"], bits_per_weight=options.get("bits_per_weight"))
            return {"quality": [report]}
        w.finish(header, amend=amend if eval_src is not None else None)
    if not quiet:
        print(f"convert: wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s",
              file=sys.stderr)
    return _read_header(out)


def _read_header(path) -> dict:
    from llmpack.formats.reader import Pack

    p = Pack(path, verify=False)
    try:
        return p.header
    finally:
        p.close()


def _bits_per_weight(types: dict, shapes: dict, opts) -> float:
    """Average storage bits per element of the weight matrices (scales and zero points counted)."""
    total_bits = sum(kind_bits(kind, shapes[name], opts) for name, kind in types.items())
    return total_bits / max(sum(shapes[n][0] * shapes[n][1] for n in types), 1)


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
