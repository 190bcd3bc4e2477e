"""One decoder layer over canonical tensors, on a calibration batch, split at its linear inputs.

The calibrating quantizers (GPTQ, AWQ, sensitivity) need the input of every linear layer,
computed with the already-quantized earlier linears. This module runs the same math as the
numpy runtime (it reuses its kernels), but on a batch (B, T, D) and stage by stage, so a
caller can quantize the linears that read one input before computing the next input.

Stages of a layer (a "group" is the linears that read the same input)::

    attn_in : attn_norm(x)            -> q, k, v  (+ gate, up in a parallel block)
    o_in    : attention context       -> o
    mlp_in  : mlp_norm(x + attn)      -> gate, up            (not in a parallel block)
    down_in : act(gate) * up | act(up) -> down
"""
from __future__ import annotations

import numpy as np

from llmpack.runtime.numpy_backend import ACTIVATIONS, _apply_rope, _layer_norm, _rms_norm, _rope_tables

LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


class LayerRunner:
    """Runs layer `i` of `model` (the header's model description) with tensors `t` (short names,
    e.g. "attn.q.weight" -> f32 array). `t` is read at each call, so replacing a weight with its
    quantized version changes what later stages see."""

    def __init__(self, model: dict, i: int, t: dict, inv_freq: dict):
        self.m, self.i, self.t = model, i, t
        self.spec = model["layers"][i]
        self.hd = model["head_dim"]
        self.eps = np.float32(model["norm_eps"])
        self.norm = _rms_norm if model["norm"] == "rms" else _layer_norm
        self.act = ACTIVATIONS[model["act"]]
        self.inv_freq = inv_freq
        self.parallel = model["parallel_block"]
        self.gated = "mlp.gate.weight" in t

    def _w(self, name):
        return self.t.get(name)

    def lin(self, x, name):
        y = x @ self.t[name + ".weight"].T
        b = self._w(name + ".bias")
        return y + b if b is not None else y

    def groups(self) -> list[tuple[str, list[str]]]:
        """(stage, linear names reading that stage's input), in execution order."""
        mlp_in = ["mlp.gate", "mlp.up"] if self.gated else ["mlp.up"]
        if self.parallel:
            return [("attn_in", ["attn.q", "attn.k", "attn.v"] + mlp_in), ("o_in", ["attn.o"]),
                    ("down_in", ["mlp.down"])]
        return [("attn_in", ["attn.q", "attn.k", "attn.v"]), ("o_in", ["attn.o"]), ("mlp_in", mlp_in),
                ("down_in", ["mlp.down"])]

    def attn_in(self, x):
        return self.norm(x, self._w("attn_norm.weight"), self._w("attn_norm.bias"), self.eps)

    def mlp_in(self, x_mid):
        return self.norm(x_mid, self._w("mlp_norm.weight"), self._w("mlp_norm.bias"), self.eps)

    def down_in(self, h):
        up = self.lin(h, "mlp.up")
        if self.gated:
            return self.act(self.lin(h, "mlp.gate")) * up
        return self.act(up)

    def o_in(self, h):
        """Attention context (B, T, H*hd) before the output projection."""
        B, T, _ = h.shape
        hd = self.hd
        q = self.lin(h, "attn.q")
        k = self.lin(h, "attn.k")
        v = self.lin(h, "attn.v")
        H, Hk = q.shape[-1] // hd, k.shape[-1] // hd
        G = H // Hk
        pos = np.arange(T)
        rope = None
        if self.spec.get("rope") is not None and self.inv_freq:
            kind = self.spec["rope"]
            rope = _rope_tables(self.inv_freq[kind], pos, self.m["rope_scaling"][kind])
        allowed = pos[None, :] <= pos[:, None]
        if self.spec.get("window"):
            allowed &= pos[None, :] > pos[:, None] - self.spec["window"]
        out = np.empty((B, T, H * hd), np.float32)
        for b in range(B):
            qb, kb, vb = q[b].reshape(T, H, hd), k[b].reshape(T, Hk, hd), v[b].reshape(T, Hk, hd)
            if self._w("attn.q_norm.weight") is not None:
                qb = _rms_norm(qb, self.t["attn.q_norm.weight"], None, self.eps)
                kb = _rms_norm(kb, self.t["attn.k_norm.weight"], None, self.eps)
            if rope is not None:
                qb, kb = _apply_rope(qb, rope), _apply_rope(kb, rope)
            qg = qb.reshape(T, Hk, G, hd).transpose(1, 2, 0, 3)  # (Hk, G, T, hd)
            s = np.matmul(qg, kb.transpose(1, 2, 0)[:, None]) * np.float32(self.m["attn_scale"])
            s = np.where(allowed, s, np.float32(-np.inf))
            s -= s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            o = np.matmul(p, vb.transpose(1, 0, 2)[:, None])  # (Hk, G, T, hd)
            out[b] = o.transpose(2, 0, 1, 3).reshape(T, H * hd)
        return out

    def attn_out(self, ctx):
        a = self.lin(ctx, "attn.o")
        if self._w("post_attn_norm.weight") is not None:
            a = self.norm(a, self.t["post_attn_norm.weight"], None, self.eps)
        return a

    def mlp_out(self, u):
        f = self.lin(u, "mlp.down")
        if self._w("post_mlp_norm.weight") is not None:
            f = self.norm(f, self.t["post_mlp_norm.weight"], None, self.eps)
        return f

    def run(self, x, on_input=None):
        """Layer output for x (B, T, D). `on_input(stage, names, X)` is called with each group's
        input before that group is used; it may replace the group's weights in `self.t` (e.g. by
        their quantized values) and may return a replacement input (after folding scales)."""
        def cb(stage, names, X):
            r = on_input(stage, names, X) if on_input else None
            return X if r is None else r

        h = self.attn_in(x)
        gs = dict(self.groups())
        h = cb("attn_in", gs["attn_in"], h)
        ctx = self.o_in(h)
        ctx = cb("o_in", gs["o_in"], ctx)
        a = self.attn_out(ctx)
        del ctx
        if self.parallel:
            u = cb("down_in", gs["down_in"], self.down_in(h))
            return x + a + self.mlp_out(u)
        x = x + a
        h = cb("mlp_in", gs["mlp_in"], self.mlp_in(x))
        u = self.down_in(h)
        del h
        u = cb("down_in", gs["down_in"], u)
        return x + self.mlp_out(u)


def embed_tokens(model: dict, embed_rows: np.ndarray, pos_embed: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
    """Calibration batch input (B, T, D) from gathered embedding rows (B, T, D)."""
    x = embed_rows.astype(np.float32)
    if model["embed_scale"]:
        x = x * np.float32(model["embed_scale"])
    if pos_embed is not None:
        x = x + pos_embed[np.arange(ids.shape[1])][None]
    return x


def final_hidden(model: dict, x, final_norm_w, final_norm_b):
    norm = _rms_norm if model["norm"] == "rms" else _layer_norm
    return norm(x, final_norm_w, final_norm_b, np.float32(model["norm_eps"]))
