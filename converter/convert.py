"""Checkpoint folder -> one .llmpack file, streaming one tensor at a time."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from llmpack.formats import quant
from llmpack.formats.errors import LlmpackError
from llmpack.formats.writer import PackWriter
from llmpack.runtime.progress import Progress

from llmpack.formats import __version__

from . import tokenizer_files
from .arch import map_name
from .checkpoint import Checkpoint
from .describe import describe, family_for, load_config

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


def _store(writer: PackWriter, name: str, arr: np.ndarray, dtype: str, group_size: int):
    if arr.ndim != 2 or name.startswith("rope."):
        writer.add_array(name, arr, "f32")  # norms, biases, tables: tiny, keep exact
    elif dtype == "q8":
        if arr.shape[1] < group_size:
            raise LlmpackError(f"{name}: group size {group_size} is larger than its {arr.shape[1]} columns")
        writer.add(name, "q8", arr.shape, quant.quantize_rtn(arr, 8, group_size), group_size=group_size)
    else:
        writer.add_array(name, arr, dtype)


def convert(src, out, dtype: str = "f16", group_size: int = 32, quiet: bool = False) -> dict:
    """Convert; returns the written header. Raises LlmpackError on bad input (nothing written)."""
    if dtype not in DTYPES:
        raise LlmpackError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
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
            "options": {"dtype": dtype, "group_size": group_size if dtype == "q8" else None},
        },
        "quality": [],
    }
    progress = Progress("convert", len(plan), quiet=quiet)
    with PackWriter(out) as w:
        for name, arr in extra.items():
            w.add_array(name, arr, "f32")
        for hf, canon, rewrite in plan:
            for name, arr in _apply_rewrite(canon, ckpt.get(hf), rewrite):
                _store(w, name, arr, dtype, group_size)
            progress.step(canon)
        w.add_blob(tok_blob_name, tok_blob)
        header["provenance"]["seconds"] = round(time.time() - t0, 2)
        w.finish(header)
    progress.done(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")
    return header


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
