"""The decoder in torch, executing the same `formats.blocks` description as the numpy runtime.

Healing needs gradients, so it cannot run the numpy math (runtime/numpy_block.py); this is the
autograd executor of that one description: the same stages, the same kernels, on a batch of
whole sequences from position 0 (no KV cache). Parity with the numpy block on every family is a
test (tests/test_heal.py). Weights come from a callable `w(name)` so that a quantized linear can
hand out its fake-quantized weight (heal/fakequant.py) and a float tensor its parameter.

Shapes: B sequences, T positions, D residual width, H query heads, Hk KV heads, G = H/Hk,
hd head dim, R rotary dims, F MLP width, V vocabulary.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from llmpack.formats.blocks import Block, Linear, ModelSpec, Norm
from llmpack.runtime.numpy_block import rope_tables

Weights = Callable[[str], "torch.Tensor | None"]  # canonical name -> tensor (None: absent bias)


def rms_norm(x, w, b, eps):
    y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y  # like the numpy kernel: an RMS norm has no bias


def layer_norm(x, w, b, eps):
    d = x - x.mean(-1, keepdim=True)
    y = d * torch.rsqrt((d * d).mean(-1, keepdim=True) + eps) * w
    return y + b if b is not None else y


NORMS = {"rms": rms_norm, "layer": layer_norm}
ACTS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on the first R dims of each head; x (B, T, H, hd), cos/sin (T, 1, R)."""
    r = cos.shape[-1]
    xr, rest = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    out = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


class TorchBlock:
    """One block's forward over weights `w`; `tables` maps rope kind -> (cos, sin) (T, 1, R)."""

    def __init__(self, spec: ModelSpec, block: Block, w: Weights):
        self.spec, self.b, self.w = spec, block, w
        self.act = ACTS[block.mlp.act]

    def norm(self, n: Norm | None, x):
        if n is None:
            return x
        return NORMS[n.kind](x, self.w(n.name + ".weight"), self.w(n.name + ".bias"), self.spec.norm_eps)

    def lin(self, lin: Linear, x):
        return F.linear(x, self.w(lin.name + ".weight"), self.w(lin.name + ".bias") if lin.bias else None)

    def attention(self, h, tables):
        a = self.b.attn
        B, T, _ = h.shape
        q = self.lin(a.q, h).view(B, T, a.n_heads, a.head_dim)
        k = self.lin(a.k, h).view(B, T, a.n_kv, a.head_dim)
        v = self.lin(a.v, h).view(B, T, a.n_kv, a.head_dim)
        if a.q_norm is not None:
            q, k = self.norm(a.q_norm, q), self.norm(a.k_norm, k)
        if a.rope is not None and a.rope in tables:
            q, k = apply_rope(q, *tables[a.rope]), apply_rope(k, *tables[a.rope])
        G = a.n_heads // a.n_kv
        q = q.view(B, T, a.n_kv, G, a.head_dim).permute(0, 2, 3, 1, 4)  # (B, Hk, G, T, hd)
        k = k.permute(0, 2, 1, 3)[:, :, None]  # (B, Hk, 1, T, hd)
        v = v.permute(0, 2, 1, 3)[:, :, None]
        scores = (q @ k.transpose(-1, -2)) * self.spec.attn_scale  # (B, Hk, G, T, T)
        pos = torch.arange(T, device=h.device)
        allowed = pos[None, :] <= pos[:, None]
        if a.window:
            allowed &= pos[None, :] > pos[:, None] - a.window
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return (p @ v).permute(0, 3, 1, 2, 4).reshape(B, T, a.n_heads * a.head_dim)

    def __call__(self, x, tables):
        """Block output (B, T, Do) for x (B, T, Di)."""
        b = self.b
        h = self.norm(b.attn_norm, x)
        a = self.norm(b.post_attn_norm, self.lin(b.attn.o, self.attention(h, tables)))
        if not b.parallel:
            x = x + a
            h = self.norm(b.mlp_norm, x)
        up = self.lin(b.mlp.up, h)
        u = self.act(self.lin(b.mlp.gate, h)) * up if b.mlp.gate is not None else self.act(up)
        m = self.norm(b.post_mlp_norm, self.lin(b.mlp.down, u))
        r = self.lin(b.shortcut, x) if b.shortcut is not None else x
        return r + a + m if b.parallel else r + m


def rope(spec: ModelSpec, inv_freq: dict, T: int, device) -> dict:
    """rope kind -> (cos, sin) tables (T, 1, R) for positions 0..T-1, as the numpy runtime builds them."""
    pos = np.arange(T)
    out = {}
    for kind, f in inv_freq.items():
        cos, sin = rope_tables(np.asarray(f, np.float32), pos, spec.rope_scaling[kind])
        out[kind] = (torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device))
    return out


def embed(spec: ModelSpec, rows, pos_rows=None):
    """Block-0 input from gathered embedding rows (B, T, D) (and learned-position rows (T, D))."""
    x = rows * spec.embed_scale if spec.embed_scale else rows
    return x + pos_rows if pos_rows is not None else x


def logits(spec: ModelSpec, w: Weights, x):
    """(B, T, V) from the last block's output: final norm, head, soft cap."""
    n = spec.final_norm
    h = NORMS[n.kind](x, w(n.name + ".weight"), w(n.name + ".bias"), spec.norm_eps)
    if spec.head_proj is not None:
        h = F.linear(h, w("head_proj.weight"))
    out = F.linear(h, w(spec.head.name + ".weight"), w(spec.head.name + ".bias") if spec.head.bias else None)
    cap = spec.final_softcap
    return torch.tanh(out / cap) * cap if cap else out
