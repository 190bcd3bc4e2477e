"""The reference backend: the whole decoder in numpy, one code path for every family.

Every per-layer size (heads, KV heads, MLP width) is read from that layer's tensor shapes,
so pruned or sliced models run unchanged. Shapes: T new tokens, S cached+new positions,
D hidden, H query heads, Hk KV heads, G = H/Hk, hd head dim, F MLP width, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmpack.formats.errors import FormatError
from llmpack.formats.reader import Pack


@dataclass
class Layer:
    attn_norm: tuple  # (weight, bias|None)
    q: tuple  # (W (H*hd, D), bias|None)
    k: tuple
    v: tuple
    o: tuple
    mlp_norm: tuple | None
    up: tuple
    down: tuple
    gate: tuple | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    post_attn_norm: np.ndarray | None
    post_mlp_norm: np.ndarray | None
    n_heads: int
    n_kv: int
    window: int | None
    rope: str | None


class KVCache:
    """Per-layer K/V arrays (Hk, capacity, hd) that grow by doubling; `length` tokens are valid."""

    def __init__(self, layers: list[Layer], head_dim: int, capacity: int = 256):
        self.length = 0
        self.k = [np.zeros((ly.n_kv, capacity, head_dim), np.float32) for ly in layers]
        self.v = [np.zeros((ly.n_kv, capacity, head_dim), np.float32) for ly in layers]

    def reserve(self, total: int):
        cap = self.k[0].shape[1] if self.k else total
        if total <= cap:
            return
        new_cap = max(total, cap * 2)
        for store in (self.k, self.v):
            for i, a in enumerate(store):
                grown = np.zeros((a.shape[0], new_cap, a.shape[2]), np.float32)
                grown[:, : self.length] = a[:, : self.length]
                store[i] = grown

    def truncate(self, length: int):
        """Forget positions >= length (chat history edits re-use the common prefix)."""
        self.length = min(self.length, length)


class NumpyBackend:
    name = "numpy"

    def __init__(self, pack: Pack):
        try:
            self._build(pack)
            self._check()
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as e:
            # The header passed the format checks but its model description is not runnable.
            raise FormatError(f"{pack.path}: the model description does not fit the file's tensors "
                              f"({e.__class__.__name__}: {e}); convert the model again") from e

    def _build(self, pack: Pack):
        self.pack = pack
        m = pack.header["model"]
        self.m = m
        self.head_dim = m["head_dim"]
        self.eps = np.float32(m["norm_eps"])
        self.norm = _rms_norm if m["norm"] == "rms" else _layer_norm
        self.act = ACTIVATIONS[m["act"]]
        self.context_length = m["context_length"]
        self._embed_type = pack.tensors["embed.weight"]["type"]
        self.embed = pack.array("embed.weight") if self._embed_type == "f32" else None
        self.vocab_size = pack.tensors["embed.weight"]["shape"][0]
        self.pos_embed = self._get("pos_embed.weight") if m["learned_pos"] else None
        self.final_norm = (self._get("final_norm.weight"), self._get("final_norm.bias"))
        if m["tied_head"]:
            self.head = (self.embed if self.embed is not None else pack.array("embed.weight"), None)
        else:
            self.head = (self._get("head.weight"), self._get("head.bias"))
        self.inv_freq = {k: pack.array(f"rope.{k}.inv_freq") for k in m.get("rope_scaling", {})}
        self.layers = [self._layer(i, spec) for i, spec in enumerate(m["layers"])]

    def _check(self):
        """Every field forward() reads has the right type, and every shape agrees with the others,
        so a malformed (but checksum-clean) header fails here rather than mid-generation."""
        m, hd = self.m, self.head_dim

        def bad(what):
            raise FormatError(f"{self.pack.path}: model description: {what}; convert the model again")

        def num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)

        def count(x):
            return isinstance(x, int) and not isinstance(x, bool) and x > 0

        if not count(hd):
            bad(f"head_dim {hd!r} is not a positive integer")
        if not count(self.context_length):
            bad(f"context_length {self.context_length!r} is not a positive integer")
        if not (num(m["norm_eps"]) and m["norm_eps"] >= 0 and num(m["attn_scale"])):
            bad("norm_eps (>= 0) and attn_scale must be numbers")
        for key in ("embed_scale", "final_softcap"):
            if m.get(key) is not None and not num(m[key]):
                bad(f"{key} {m[key]!r} is not a number")
        if m["norm"] not in ("rms", "layer"):
            bad(f"unknown norm {m['norm']!r}")
        if not all(isinstance(m.get(k), bool) for k in ("learned_pos", "tied_head", "parallel_block")):
            bad("learned_pos, tied_head and parallel_block must be booleans")
        if not (isinstance(m["layers"], list) and len(m["layers"]) == m.get("n_layers", len(m["layers"]))
                and all(isinstance(spec, dict) for spec in m["layers"])):
            bad("layers must be a list of n_layers objects")
        if not all(num(v) for v in m.get("rope_scaling", {}).values()):
            bad("rope_scaling values must be numbers")
        V, D = self.pack.tensors["embed.weight"]["shape"]
        expect = {"final_norm.weight": (D,), "final_norm.bias": (D,), "head.weight": (V, D), "head.bias": (V,)}
        if self.pos_embed is not None:
            if self.pos_embed.shape[1:] != (D,) or self.pos_embed.shape[0] < self.context_length:
                bad(f"pos_embed.weight {self.pos_embed.shape} does not cover {self.context_length} positions of {D}")
        for kind, f in self.inv_freq.items():
            if f.ndim != 1 or not 0 < 2 * f.shape[0] <= hd:
                bad(f"rope.{kind}.inv_freq {f.shape} does not fit head_dim {hd}")
        for i, (ly, spec) in enumerate(zip(self.layers, m["layers"])):
            p = f"layers.{i}."
            for what, lin in (("attn.q", ly.q), ("attn.k", ly.k), ("attn.v", ly.v), ("attn.o", ly.o),
                              ("mlp.up", ly.up), ("mlp.down", ly.down)):
                if lin is None:
                    bad(f"tensor {p}{what}.weight is missing")
            if ly.attn_norm[0] is None or (ly.mlp_norm is None and not m["parallel_block"]):
                bad(f"layer {i} lacks a norm")
            Hq, Hk, F = ly.q[0].shape[0], ly.k[0].shape[0], ly.up[0].shape[0]
            if Hq % hd or Hk % hd or Hk == 0 or ly.n_heads % ly.n_kv:
                bad(f"layer {i}: q/k rows {Hq}/{Hk} are not whole heads of {hd} in groups")
            expect.update({p + "attn.q.weight": (Hq, D), p + "attn.k.weight": (Hk, D),
                           p + "attn.v.weight": (Hk, D), p + "attn.o.weight": (D, Hq),
                           p + "attn.q.bias": (Hq,), p + "attn.k.bias": (Hk,), p + "attn.v.bias": (Hk,),
                           p + "attn.o.bias": (D,), p + "mlp.up.weight": (F, D), p + "mlp.gate.weight": (F, D),
                           p + "mlp.down.weight": (D, F), p + "mlp.up.bias": (F,), p + "mlp.gate.bias": (F,),
                           p + "mlp.down.bias": (D,), p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,)})
            for norm in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm"):
                expect[f"{p}{norm}.weight"] = expect[f"{p}{norm}.bias"] = (D,)
            if (ly.q_norm is None) != (ly.k_norm is None):
                bad(f"layer {i} has only one of q_norm / k_norm")
            window = spec.get("window")
            if window is not None and not count(window):
                bad(f"layer {i}: window {window!r} is not a positive integer")
            if self.inv_freq and spec.get("rope") not in self.inv_freq:
                bad(f"layer {i}: rope kind {spec.get('rope')!r} has no inv_freq table")
        for name, shape in expect.items():
            if name in self.pack and tuple(self.pack.tensors[name]["shape"]) != shape:
                bad(f"tensor {name} has shape {tuple(self.pack.tensors[name]['shape'])}, expected {shape}")

    # -- loading ---------------------------------------------------------------------------
    def _get(self, name):
        # f32 tensors are zero-copy views of the mapped file; other types are widened once here.
        return self.pack.array(name) if name in self.pack else None

    def _lin(self, prefix):
        if prefix + ".weight" not in self.pack:
            return None
        return (self._get(prefix + ".weight"), self._get(prefix + ".bias"))

    def _layer(self, i, spec) -> Layer:
        p = f"layers.{i}."
        q = self._lin(p + "attn.q")
        k = self._lin(p + "attn.k")
        return Layer(
            attn_norm=(self._get(p + "attn_norm.weight"), self._get(p + "attn_norm.bias")),
            q=q, k=k, v=self._lin(p + "attn.v"), o=self._lin(p + "attn.o"),
            mlp_norm=(self._get(p + "mlp_norm.weight"), self._get(p + "mlp_norm.bias"))
            if p + "mlp_norm.weight" in self.pack else None,
            up=self._lin(p + "mlp.up"), down=self._lin(p + "mlp.down"), gate=self._lin(p + "mlp.gate"),
            q_norm=self._get(p + "attn.q_norm.weight"), k_norm=self._get(p + "attn.k_norm.weight"),
            post_attn_norm=self._get(p + "post_attn_norm.weight"),
            post_mlp_norm=self._get(p + "post_mlp_norm.weight"),
            n_heads=q[0].shape[0] // self.head_dim, n_kv=k[0].shape[0] // self.head_dim,
            window=spec.get("window"), rope=spec.get("rope"),
        )

    # -- forward ---------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(self.layers, self.head_dim)

    def forward(self, ids, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Run T new tokens after the cached ones; returns logits (T, V) or (1, V) if last_only."""
        ids = np.asarray(ids, np.int64)
        T, start = len(ids), cache.length
        if start + T > self.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.context_length}")
        cache.reserve(start + T)
        pos = np.arange(start, start + T)
        x = self._embed(ids, pos)  # (T, D)
        rope = {k: _rope_tables(f, pos, self.m["rope_scaling"][k]) for k, f in self.inv_freq.items()}
        for li, ly in enumerate(self.layers):
            h = self.norm(x, *ly.attn_norm, self.eps)
            a = self._attention(h, ly, li, cache, start, rope.get(ly.rope))
            if ly.post_attn_norm is not None:
                a = self.norm(a, ly.post_attn_norm, None, self.eps)
            if self.m["parallel_block"]:
                x = x + a + self._mlp(h, ly)
                continue
            x = x + a
            h = self.norm(x, *ly.mlp_norm, self.eps)
            f = self._mlp(h, ly)
            if ly.post_mlp_norm is not None:
                f = self.norm(f, ly.post_mlp_norm, None, self.eps)
            x = x + f
        cache.length = start + T
        if last_only:
            x = x[-1:]
        x = self.norm(x, *self.final_norm, self.eps)
        logits = _linear(x, *self.head)
        cap = self.m.get("final_softcap")
        if cap:
            logits = np.tanh(logits / cap) * cap
        return logits

    def _embed(self, ids, pos):
        if self.embed is not None:
            x = self.embed[ids]
        else:  # f16 / bf16 / quantized: widen only the rows we need
            x = self.pack.array("embed.weight", rows=ids)
        if self.m["embed_scale"]:
            x = x * np.float32(self.m["embed_scale"])
        if self.pos_embed is not None:
            x = x + self.pos_embed[pos]
        return x.astype(np.float32, copy=False)

    def _attention(self, h, ly: Layer, li, cache: KVCache, start, rope):
        T, hd = h.shape[0], self.head_dim
        H, Hk = ly.n_heads, ly.n_kv
        G = H // Hk
        q = _linear(h, *ly.q).reshape(T, H, hd)
        k = _linear(h, *ly.k).reshape(T, Hk, hd)
        v = _linear(h, *ly.v).reshape(T, Hk, hd)
        if ly.q_norm is not None:
            q = _rms_norm(q, ly.q_norm, None, self.eps)
            k = _rms_norm(k, ly.k_norm, None, self.eps)
        if rope is not None:
            q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        S = start + T
        cache.k[li][:, start:S] = k.transpose(1, 0, 2)
        cache.v[li][:, start:S] = v.transpose(1, 0, 2)
        K, V = cache.k[li][:, :S], cache.v[li][:, :S]  # (Hk, S, hd)
        qg = q.reshape(T, Hk, G, hd).transpose(1, 2, 0, 3)  # (Hk, G, T, hd)
        scores = np.matmul(qg, K[:, None].transpose(0, 1, 3, 2)) * np.float32(self.m["attn_scale"])  # (Hk,G,T,S)
        qpos = np.arange(start, S)[:, None]
        kpos = np.arange(S)[None, :]
        allowed = kpos <= qpos
        if ly.window:
            allowed &= kpos > qpos - ly.window
        scores = np.where(allowed, scores, np.float32(-np.inf))
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.matmul(p, V[:, None])  # (Hk, G, T, hd)
        out = out.transpose(2, 0, 1, 3).reshape(T, H * hd)
        return _linear(out, *ly.o)

    def _mlp(self, h, ly: Layer):
        up = _linear(h, *ly.up)
        if ly.gate is not None:
            up = self.act(_linear(h, *ly.gate)) * up
        else:
            up = self.act(up)
        return _linear(up, *ly.down)


# -- kernels -------------------------------------------------------------------------------
def _linear(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def _rms_norm(x, w, b, eps):
    y = x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))
    return y * w if w is not None else y


def _layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    y = d / np.sqrt(np.mean(d * d, axis=-1, keepdims=True) + eps)
    y = y * w
    return y + b if b is not None else y


def _rope_tables(inv_freq, pos, scaling):
    f = pos.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, R/2), in float32 as transformers does
    emb = np.concatenate([f, f], axis=-1)
    return (np.cos(emb) * np.float32(scaling))[:, None, :], (np.sin(emb) * np.float32(scaling))[:, None, :]


def _apply_rope(x, tables):
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
