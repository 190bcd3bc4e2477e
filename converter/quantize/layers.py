"""One decoder block on a calibration batch, split at its linear inputs.

The calibrating steps (GPTQ, AWQ, sensitivity, slicing, pruning) need the input of every
linear layer, computed with the already-compressed earlier linears. The math is the numpy
runtime's own (runtime/numpy_block.py, executing the block's formats.blocks description),
here on a batch (B, T, D) with a fresh causal attention per row, stage by stage, so a caller
can change the linears that read one input before the next input is computed.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from llmpack.formats.blocks import Block, ModelSpec
from llmpack.runtime.numpy_block import NORM_KERNELS, BlockMath, embed, rope_tables


class ShortNames(Mapping):
    """A layer's tensors keyed by short names ("attn.q.weight") seen under canonical names
    ("layers.3.attn.q.weight"): the converter keeps short names, the block math full ones."""

    def __init__(self, t: dict, prefix: str):
        self.t, self.prefix = t, prefix

    def __getitem__(self, name):
        if not name.startswith(self.prefix):
            raise KeyError(name)
        return self.t[name[len(self.prefix):]]

    def __iter__(self):
        return (self.prefix + k for k in self.t)

    def __len__(self):
        return len(self.t)


class LayerRunner:
    """Runs `block` (model-wide constants from `spec`) with tensors `t` (short names -> f32 arrays). `t` is read at
    each call, so replacing a weight with its quantized version changes what later stages see."""

    def __init__(self, spec: ModelSpec, block: Block, t: dict, inv_freq: dict):
        self.spec, self.t = spec, t
        self.block = block
        self.prefix = self.block.prefix
        self.math = BlockMath(spec, self.block, ShortNames(t, self.prefix))
        self.inv_freq = inv_freq
        self.gated = self.block.mlp.gate is not None

    def short(self, lin) -> str:
        return lin.name[len(self.prefix):]

    def groups(self) -> list[tuple[str, list[str]]]:
        """(stage, short names of the linears reading that stage's input), in execution order."""
        return [(stage, [self.short(x) for x in lins]) for stage, lins in self.math.groups()]

    def attend(self, h):
        """Causal attention context (B, T, H*hd) of a batch h (B, T, D), each row from position 0."""
        B, T, _ = h.shape
        a = self.block.attn
        pos = np.arange(T)
        rope = {k: rope_tables(f, pos, self.spec.rope_scaling[k]) for k, f in self.inv_freq.items()}
        out = np.empty((B, T, a.n_heads * a.head_dim), np.float32)
        for b in range(B):
            K = np.empty((a.n_kv, T, a.head_dim), np.float32)
            V = np.empty_like(K)
            out[b] = self.math.attention(h[b], K, V, 0, rope)
        return out

    def run(self, x, on_input=None):
        """Block output for x (B, T, D). `on_input(stage, short_names, X)` is called with each
        group's input before that group is used; it may replace the group's weights in `t` and
        may return a replacement input (after folding scales)."""
        cb = None
        if on_input is not None:
            def cb(stage, lins, X):
                return on_input(stage, [self.short(x) for x in lins], X)
        return self.math.run(x, self.attend, cb)


def embed_tokens(spec: ModelSpec, embed_rows: np.ndarray, pos_embed: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
    """Calibration batch input (B, T, D) from gathered embedding rows (B, T, D)."""
    pos_rows = pos_embed[np.arange(ids.shape[1])][None] if pos_embed is not None else None
    return embed(spec, embed_rows.astype(np.float32), pos_rows)


def final_hidden(norm_kind: str, eps: float, x, tensors: dict):
    """The head's input: the final norm (of kind `norm_kind`) of the last block's output."""
    return NORM_KERNELS[norm_kind](x, tensors["final_norm.weight"], tensors.get("final_norm.bias"), np.float32(eps))
