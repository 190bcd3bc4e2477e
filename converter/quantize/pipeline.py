"""Layer-by-layer calibrated quantization (GPTQ / AWQ / RTN with importance), streaming to the writer.

Memory stays near one decoder layer plus the calibration activations:

1. the embedding is quantized (RTN, row-wise) and written; only the calibration tokens' rows are
   dequantized to form the batch x (B, T, D);
2. for each layer: its tensors are read from the checkpoint; with AWQ the layer first runs in
   full precision and the searched scales are folded in; then the layer runs again, stage by
   stage (layers.LayerRunner), and each group of linears is quantized as soon as its input is
   known — so q/k/v see the quantized earlier layers, o sees the quantized q/k/v, down sees the
   quantized gate/up (GPTQ's "true sequential" order). The output of the quantized layer is the
   next layer's input. The layer is written and dropped;
3. the final norm and the head (GPTQ on the final hidden states) are quantized and written.
"""
from __future__ import annotations

import numpy as np

from llmpack.formats import quant
from llmpack.runtime.progress import Progress

from . import awq
from .gptq import HessianFactor, gptq_quantize
from .layers import LayerRunner, embed_tokens, final_hidden
from .options import is_quantized


def store(writer, name: str, arr: np.ndarray, types: dict, opts, float_dtype: str, importance=None):
    """Write one tensor as the plan says: quantized (RTN), a float type, or f32 for vectors/tables."""
    kind = types.get(name)
    if is_quantized(kind):
        bits, g = kind
        writer.add(name, f"q{bits}", arr.shape,
                   quant.quantize_rtn(arr, bits, g, opts.sym(bits), importance=importance), group_size=g)
        return
    if kind is not None:
        writer.add_array(name, arr, kind)
    elif arr.ndim != 2 or name.startswith("rope."):
        writer.add_array(name, arr, "f32")  # norms, biases, tables: tiny, keep exact
    else:
        writer.add_array(name, arr, float_dtype)


class _Quantizer:
    """Quantizes groups of linears that share an input, recording the parts to write."""

    def __init__(self, types, opts):
        self.types, self.opts = types, opts
        self.parts = {}

    def group(self, t: dict, prefix: str, names: list[str], X: np.ndarray):
        todo = [n for n in names if is_quantized(self.types.get(f"{prefix}{n}.weight"))]
        if not todo:
            return
        Xf = X.reshape(-1, X.shape[-1])
        opts = self.opts
        if opts.uses_gptq:
            factor = HessianFactor.from_inputs(Xf, act_order=opts.act_order, damp=opts.damp)
        else:
            imp = (Xf.astype(np.float64) ** 2).mean(axis=0)
        for n in todo:
            key = f"{n}.weight"
            bits, g = self.types[prefix + key]
            W = t[key]
            if opts.uses_gptq:
                # the head's dequantized copy feeds nothing (2.2 GB at the 7B shape): skip it
                parts, deq = gptq_quantize(W, factor, bits, g, opts.sym(bits), dequantized=bool(prefix))
            else:
                parts = quant.quantize_rtn(W, bits, g, opts.sym(bits), importance=imp)
                deq = quant.dequantize(parts, W.shape, bits, g)
            self.parts[prefix + key] = (bits, g, W.shape, parts)
            t[key] = deq if deq is not None else W


def run(writer, source, model: dict, inv_freq: dict, types: dict, opts, ids: np.ndarray,
        float_dtype: str, quiet: bool = False):
    """Write every tensor of `source` (see convert.TensorSource), calibrating on `ids` (B, T)."""
    q = _Quantizer(types, opts)
    n_layers = model["n_layers"]
    progress = Progress("quantize", n_layers + 2, quiet=quiet)

    pre = source.load(source.pre)
    for name in sorted(pre):
        if name == "embed.weight":
            continue
        store(writer, name, pre[name], types, opts, float_dtype)
    emb = pre.pop("embed.weight")
    kind = types.get("embed.weight")
    if is_quantized(kind):  # row-wise RTN; only the calibration tokens' rows are dequantized
        bits, g = kind
        parts = quant.quantize_rtn(emb, bits, g, opts.sym(bits))
        writer.add("embed.weight", f"q{bits}", emb.shape, parts, group_size=g)
        rows = quant.dequantize(parts, emb.shape, bits, g, rows=ids.ravel())
        del parts
    else:
        store(writer, "embed.weight", emb, types, opts, float_dtype)
        rows = emb[ids.ravel()]
    x = embed_tokens(model, rows.reshape(ids.shape + (-1,)), pre.get("pos_embed.weight"), ids)
    del emb, rows
    progress.step("embedding")

    for i in range(n_layers):
        prefix = f"layers.{i}."
        t = {n[len(prefix):]: a for n, a in source.load(source.layers[i]).items()}  # only reference: replaced
        # weights are freed as they are quantized
        runner = LayerRunner(model, i, t, inv_freq)
        if opts.uses_awq:
            runner.run(x, lambda stage, names, X: _awq_stage(t, prefix, stage, names, X, types, opts, runner.gated))
        x = runner.run(x, lambda stage, names, X: q.group(t, prefix, names, X))
        for short in sorted(t):
            name = prefix + short
            if name in q.parts:
                bits, g, shape, parts = q.parts.pop(name)
                writer.add(name, f"q{bits}", shape, parts, group_size=g)
            else:
                store(writer, name, t[short], types, opts, float_dtype)
        del t, runner  # not alive beside the next layer (or the 2.2 GB head at the 7B shape)
        progress.step(f"layer {i}")

    post = source.load(source.post)
    if "head.weight" in post and is_quantized(types.get("head.weight")):
        hx = final_hidden(model, x, post["final_norm.weight"], post.get("final_norm.bias"))
        if opts.uses_awq:
            bits, g = types["head.weight"]
            s = awq.search_scales(hx, [post["head.weight"]], bits, g, opts.sym(bits), seed=opts.seed)
            awq.fold(post, "head_in", ["head"], s, gated=False)
            hx = hx / s
        q.group(post, "", ["head"], hx)
    for name in sorted(post):
        if name in q.parts:
            bits, g, shape, parts = q.parts.pop(name)
            writer.add(name, f"q{bits}", shape, parts, group_size=g)
        else:
            store(writer, name, post[name], types, opts, float_dtype)
    progress.step("head")
    progress.done()


def _awq_stage(t, prefix, stage, names, X, types, opts, gated):
    wnames = [n for n in names if is_quantized(types.get(f"{prefix}{n}.weight"))]
    if len(wnames) != len(names):  # part of the group stays float: leave it unscaled
        return None
    bits, g = min(types[f"{prefix}{n}.weight"] for n in names)  # search for the coarsest member
    if stage in ("o_in",) and t["attn.v.weight"].shape[0] != t["attn.o.weight"].shape[1]:
        return None
    if stage == "down_in" and not gated:
        return None
    s = awq.search_scales(X, [t[f"{n}.weight"] for n in names], bits, g, opts.sym(bits),
                          seed=opts.seed)
    if not awq.fold(t, stage, names, s, gated):
        return None
    return X / s
