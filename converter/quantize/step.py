"""Calibrated quantization (GPTQ / AWQ / RTN with importance) as a step of the layer stream.

1. the embedding is quantized (RTN, row-wise); only the calibration tokens' rows are
   dequantized to form the batch x (B, T, D);
2. each block: with AWQ it first runs in full precision and the searched scales are folded in;
   then it runs again, stage by stage (layers.LayerRunner), and each group of linears is
   quantized as soon as its input is known — q/k/v see the quantized earlier blocks, o the
   quantized q/k/v, down the quantized gate/up (GPTQ's "true sequential" order). The output of
   the quantized block is the next block's input;
3. the head is quantized by GPTQ on the final hidden states.
Quantized parts are handed to the stream (Stream.parts), which writes them.
"""
from __future__ import annotations

import numpy as np

from llmpack.formats import quant, sparse

from ..stream import Step, Stream
from . import awq, sparsity
from .gptq import HessianFactor, gptq_quantize
from .layers import final_hidden
from .options import is_quantized


def release_applied(s: Stream, t: dict, prefix: str, keep: tuple):
    """Free the dequantized copies of a block's quantized linears once the block has applied
    them. When the down projection's input arrives every linear but the down projection and the
    shortcut has been applied (runtime/numpy_block.BlockMath.run, both block forms), and the
    stream writes a quantized tensor from its stored parts, so each copy becomes a zero-byte
    placeholder of its shape. At the Qwen2.5-7B width these copies were 0.66 GB of the 4.43 GB
    peak, reached while the down projection's 18944-wide Hessian is alive: 3.89 GB since (docs/scale.md)."""
    for short, arr in t.items():
        if short.endswith(".weight") and short not in keep and prefix + short in s.parts and arr.ndim == 2:
            t[short] = np.broadcast_to(np.zeros((), arr.dtype), arr.shape)


class QuantizeStep(Step):
    name = "quantize"

    def __init__(self, opts):
        self.opts = opts

    def options(self) -> dict:
        return self.opts.describe()

    def group(self, s: Stream, t: dict, prefix: str, names: list[str], X: np.ndarray):
        """Quantize the linears `names` (short names under `prefix`) that read input X."""
        todo = [n for n in names if is_quantized(s.kind(f"{prefix}{n}.weight"))]
        if not todo:
            return
        Xf = X.reshape(-1, X.shape[-1])
        opts = self.opts
        if opts.uses_gptq:
            pruning = opts.sparse is not None and sparsity.applies(prefix)  # SparseGPT: natural column order
            factor = HessianFactor.from_inputs(Xf, act_order=opts.act_order and not pruning, damp=opts.damp)
        else:
            imp = (Xf.astype(np.float64) ** 2).mean(axis=0)
        for n in todo:
            key = f"{n}.weight"
            W = t[key]
            bits, g = s.kind(prefix + key)
            if W.shape[1] < g:
                continue  # narrower than a group: the stream keeps it float
            sp = opts.sparse if sparsity.applies(prefix + key) else None
            if opts.uses_gptq:  # SparseGPT when pruning
                # the head's dequantized copy feeds nothing (2.2 GB at the 7B shape): skip it
                parts, deq = gptq_quantize(W, factor, bits, g, opts.sym(bits), prune=sparsity.sparsegpt_selector(sp),
                                           dequantized=bool(prefix))
            else:
                if sp is not None:  # Wanda
                    W = W * sparsity.wanda_keep(sp, W, imp)
                parts = quant.quantize_rtn(W, bits, g, opts.sym(bits), importance=imp)
                deq = quant.dequantize(parts, W.shape, bits, g)
            typ, nnz = f"q{bits}", None
            if sp is not None:  # stored without the zero weights (if that is smaller); expands to `deq`
                typ, parts, nnz = sparse.smallest(parts, bits, g, sp.pattern)
            s.parts[prefix + key] = (typ, g, W.shape, parts, nnz)
            t[key] = deq if deq is not None else W

    def pre(self, s: Stream, pre: dict):
        kind = s.kind("embed.weight")
        if not is_quantized(kind):
            return
        emb = pre["embed.weight"]  # row-wise RTN; only the calibration tokens' rows are dequantized
        bits, g = kind
        parts = quant.quantize_rtn(emb, bits, g, self.opts.sym(bits))
        s.parts["embed.weight"] = (f"q{bits}", g, emb.shape, parts, None)
        s.embed_rows = quant.dequantize(parts, emb.shape, bits, g, rows=s.ids.ravel())

    def layer(self, s: Stream, j: int, t: dict, x):
        prefix = f"layers.{j}."
        runner = s.runner(j, t)
        if self.opts.uses_awq:
            runner.run(x, lambda stage, names, X: self._awq_stage(s, t, prefix, stage, names, X, runner.gated))

        def on_input(stage, names, X):
            if stage == "down_in":
                release_applied(s, t, prefix, keep=("mlp.down.weight", "shortcut.weight"))
            self.group(s, t, prefix, names, X)
        return runner.run(x, on_input)

    def post(self, s: Stream, post: dict, x):
        if "head.weight" not in post or not is_quantized(s.kind("head.weight")):
            return
        hx = final_hidden(s.model["norm"], s.spec.norm_eps, x, post)
        if self.opts.uses_awq:
            bits, g = s.kind("head.weight")
            sc = awq.search_scales(hx, [post["head.weight"]], bits, g, self.opts.sym(bits), seed=self.opts.seed)
            awq.fold(post, "head_in", ["head"], sc, gated=False)
            hx = hx / sc
        self.group(s, post, "", ["head"], hx)

    def _awq_stage(self, s, t, prefix, stage, names, X, gated):
        kinds = [s.kind(f"{prefix}{n}.weight") for n in names]
        return awq.scale_group(t, stage, names, X, kinds, self.opts.sym, gated, seed=self.opts.seed)
