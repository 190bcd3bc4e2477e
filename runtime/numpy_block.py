"""One decoder block in numpy, executing a `formats.blocks.Block` description.

The reference math, written once: the numpy backend runs it on one sequence with a KV cache,
the converter's calibration runner on a batch, stage by stage (converter/quantize/layers.py).
Shapes: T new tokens, S cached+new positions, D residual width, H query heads, Hk KV heads,
G = H/Hk, hd head dim, F MLP width. Weights come from a mapping of canonical tensor names to
float32 arrays, read at each use (so a caller may swap in quantized or pruned weights).

Stages of a block (a "group" is the linears that read the same input)::

    attn_in : attn_norm(x)               -> q, k, v  (+ gate, up in a parallel block)
    o_in    : attention context          -> o
    res_in  : the residual before the MLP add  -> shortcut   (sliced models only)
    mlp_in  : mlp_norm(x + attn)         -> gate, up            (not in a parallel block)
    down_in : act(gate) * up | act(up)   -> down
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from llmpack.formats.blocks import Block, Linear, ModelSpec, Norm


def linear(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def rms_norm(x, w, b, eps):
    y = x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))
    return y * w if w is not None else y


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    y = d / np.sqrt(np.mean(d * d, axis=-1, keepdims=True) + eps)
    y = y * w
    return y + b if b is not None else y


NORM_KERNELS = {"rms": rms_norm, "layer": layer_norm}


def rope_tables(inv_freq, pos, scaling):
    """(cos, sin) of shape (T, 1, R) for positions `pos`, the rope scaling folded in."""
    f = pos.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, R/2), in float32 as transformers does
    emb = np.concatenate([f, f], axis=-1)
    return (np.cos(emb) * np.float32(scaling))[:, None, :], (np.sin(emb) * np.float32(scaling))[:, None, :]


def apply_rope(x, tables):
    """Rotate-half RoPE on the first R dims of each head; x (T, H, hd)."""
    cos, sin = tables
    r = cos.shape[-1]
    xr, rest = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = np.concatenate([-x2, x1], axis=-1)
    out = xr * cos + rot * sin
    return np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def _erf(x):
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf and scipy is not a dependency.
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return (s * y).astype(np.float32)


ACTIVATIONS = {
    "silu": lambda x: x * (0.5 * (1.0 + np.tanh(x * np.float32(0.5)))),  # sigmoid via tanh: no overflow
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x))),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476))),
    "relu": lambda x: np.maximum(x, 0),
}

# on_input(stage, linears, X) -> replacement X or None; see the module docstring.
OnInput = Callable[[str, list, np.ndarray], "np.ndarray | None"]


class BlockMath:
    """The math of one block over weights `w` (canonical name -> f32 array)."""

    def __init__(self, spec: ModelSpec, block: Block, w: Mapping):
        self.spec, self.b, self.w = spec, block, w
        self.eps = np.float32(spec.norm_eps)
        self.act = ACTIVATIONS[block.mlp.act]

    def norm(self, n: Norm | None, x):
        if n is None:
            return x
        return NORM_KERNELS[n.kind](x, self.w[n.name + ".weight"], self.w.get(n.name + ".bias"), self.eps)

    def lin(self, lin: Linear, x):
        return linear(x, self.w[lin.name + ".weight"], self.w.get(lin.name + ".bias") if lin.bias else None)

    def groups(self) -> list[tuple[str, list[Linear]]]:
        """(stage, linears reading that stage's input), in execution order."""
        b = self.b
        a, mlp = b.attn, b.mlp
        mlp_in = [x for x in (mlp.gate, mlp.up) if x is not None]
        first = [a.q, a.k, a.v] + (mlp_in if b.parallel else [])
        out = [("attn_in", first), ("o_in", [a.o])]
        if b.shortcut is not None:
            out.append(("res_in", [b.shortcut]))
        if not b.parallel:
            out.append(("mlp_in", mlp_in))
        return out + [("down_in", [mlp.down])]

    # -- stages ------------------------------------------------------------------------------
    def attn_in(self, x):
        return self.norm(self.b.attn_norm, x)

    def attention(self, h, K, V, start: int, rope: dict):
        """Context (T, H*hd) of one sequence h (T, D) after `start` cached positions; writes this
        call's keys/values into K, V (Hk, >= start+T, hd)."""
        a, T = self.b.attn, h.shape[0]
        H, Hk, hd = a.n_heads, a.n_kv, a.head_dim
        G = H // Hk
        q = self.lin(a.q, h).reshape(T, H, hd)
        k = self.lin(a.k, h).reshape(T, Hk, hd)
        v = self.lin(a.v, h).reshape(T, Hk, hd)
        if a.q_norm is not None:
            q, k = self.norm(a.q_norm, q), self.norm(a.k_norm, k)
        tables = rope.get(a.rope) if a.rope is not None else None
        if tables is not None:
            q, k = apply_rope(q, tables), apply_rope(k, tables)
        S = start + T
        K[:, start:S] = k.transpose(1, 0, 2)
        V[:, start:S] = v.transpose(1, 0, 2)
        qg = q.reshape(T, Hk, G, hd).transpose(1, 2, 0, 3)  # (Hk, G, T, hd)
        scores = np.matmul(qg, K[:, None, :S].transpose(0, 1, 3, 2)) * np.float32(self.spec.attn_scale)
        qpos = np.arange(start, S)[:, None]
        kpos = np.arange(S)[None, :]
        allowed = kpos <= qpos
        if a.window:
            allowed &= kpos > qpos - a.window
        scores = np.where(allowed, scores, np.float32(-np.inf))  # (Hk, G, T, S)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.matmul(p, V[:, None, :S])  # (Hk, G, T, hd)
        return out.transpose(2, 0, 1, 3).reshape(T, H * hd)

    def attn_out(self, ctx):
        return self.norm(self.b.post_attn_norm, self.lin(self.b.attn.o, ctx))

    def residual(self, x):
        return x if self.b.shortcut is None else self.lin(self.b.shortcut, x)

    def mlp_in(self, x):
        return self.norm(self.b.mlp_norm, x)

    def down_in(self, h):
        if h.ndim == 3:  # a calibration batch (B, T, D): a row at a time, so the up, gate and
            # activation temporaries are one row's, not the batch's (0.62 GB each at the 7B width with
            # 16 x 512 tokens; they sat on top of GPTQ's peak, docs/scale.md)
            out = np.empty(h.shape[:2] + (self.b.mlp.width,), np.float32)
            for i, row in enumerate(h):
                out[i] = self.down_in(row)
            return out
        mlp = self.b.mlp
        up = self.lin(mlp.up, h)
        if mlp.gate is not None:
            return self.act(self.lin(mlp.gate, h)) * up
        return self.act(up)

    def mlp_out(self, u):
        return self.norm(self.b.post_mlp_norm, self.lin(self.b.mlp.down, u))

    def run(self, x, attend: Callable, on_input: OnInput | None = None):
        """Block output for x (..., D). `attend(h)` returns the attention context of h;
        `on_input(stage, linears, X)` sees each group's input before the group is used (it may
        replace their weights in `w`, and may return a replacement input)."""
        groups = dict(self.groups())

        def cb(stage, X):
            r = on_input(stage, groups[stage], X) if on_input else None
            return X if r is None else r

        h = cb("attn_in", self.attn_in(x))
        a = self.attn_out(cb("o_in", attend(h)))
        if self.b.parallel:
            u = cb("down_in", self.down_in(h))
            r = self.residual(cb("res_in", x)) if self.b.shortcut is not None else x
            return r + a + self.mlp_out(u)
        x = x + a
        del h
        u = cb("down_in", self.down_in(cb("mlp_in", self.mlp_in(x))))
        r = self.residual(cb("res_in", x)) if self.b.shortcut is not None else x
        return r + self.mlp_out(u)


def embed(spec: ModelSpec, rows, pos_rows=None):
    """Block-0 input from gathered embedding rows (..., D) and learned-position rows."""
    x = rows
    if spec.embed_scale:
        x = x * np.float32(spec.embed_scale)
    if pos_rows is not None:
        x = x + pos_rows
    return x.astype(np.float32, copy=False)


def final_hidden(spec: ModelSpec, w: Mapping, x):
    n = spec.final_norm
    return NORM_KERNELS[n.kind](x, w[n.name + ".weight"], w.get(n.name + ".bias"), np.float32(spec.norm_eps))


def softcap(spec: ModelSpec, logits):
    cap = spec.final_softcap
    return np.tanh(logits / cap) * cap if cap else logits
