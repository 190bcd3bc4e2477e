"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales.

For a group of linears reading the same input X, W' = W * s (columns) and X' = X / s leave
X W^T unchanged, but the rounding error of W' lands differently: channels with large
activations get finer resolution. s = mean|X|^alpha (normalized), with alpha searched on the
calibration batch for the least output error after quantization. The 1/s is folded into
whatever produces X — the norm before q/k/v (and before gate/up), the v projection before o
(only without grouped KV heads, where v's rows map one to one onto o's columns), the up
projection before down (gated MLPs only: an activation in between does not commute with s).
After folding, the full-precision model computes exactly the same function; the scaled weights
are then quantized by RTN or GPTQ.
"""
from __future__ import annotations

import numpy as np

from llmpack.formats import quant


def search_scales(X: np.ndarray, weights: list[np.ndarray], bits: int, group_size: int, symmetric: bool,
                  n_grid: int = 10, max_tokens: int = 1024, seed: int = 0) -> np.ndarray:
    """Best per-channel scale s (K,) for the linears `weights` (each (N_i, K)) reading X (M, K)."""
    X = X.reshape(-1, X.shape[-1]).astype(np.float32)
    x_mean = np.abs(X).mean(axis=0).astype(np.float64)
    if len(X) > max_tokens:
        X = X[np.random.default_rng(seed).choice(len(X), max_tokens, replace=False)]
    W = np.concatenate(weights, axis=0)
    ref = X @ W.T
    best_err, best_s = np.inf, np.ones(W.shape[1], np.float32)
    for a in np.arange(n_grid) / n_grid:
        s = np.maximum(x_mean, 1e-4) ** a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        Wq = quant.dequantize(quant.quantize_rtn(W * s, bits, group_size, symmetric, search=False),
                              W.shape, bits, group_size) / s
        err = float(((X @ Wq.T - ref) ** 2).mean())
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def fold(t: dict, stage: str, names: list[str], s: np.ndarray, gated: bool) -> bool:
    """Fold scales s into layer tensors `t` (short names) for the group reading `stage`'s input.
    Returns False (and changes nothing) where the producer of the input cannot absorb 1/s."""
    if stage == "attn_in":
        prev = [("attn_norm.weight", None), ("attn_norm.bias", None)]
    elif stage == "mlp_in":
        prev = [("mlp_norm.weight", None), ("mlp_norm.bias", None)]
    elif stage == "o_in":
        if t["attn.v.weight"].shape[0] != t["attn.o.weight"].shape[1]:
            return False
        prev = [("attn.v.weight", "rows"), ("attn.v.bias", None)]
    elif stage == "down_in":
        if not gated:
            return False
        prev = [("mlp.up.weight", "rows"), ("mlp.up.bias", None)]
    elif stage == "head_in":
        prev = [("final_norm.weight", None), ("final_norm.bias", None)]
    else:
        raise AssertionError(stage)
    for name, how in prev:
        if name in t and t[name] is not None:
            t[name] = t[name] / (s[:, None] if how == "rows" else s)
    for n in names:
        t[n + ".weight"] = t[n + ".weight"] * s[None, :]
    return True


def scale_group(t: dict, stage: str, names: list[str], X: np.ndarray, kinds: list, symmetric, gated: bool,
                seed: int = 0):
    """Search and fold AWQ scales for one group of linears (short names in `t`) reading X at
    `stage`; `kinds` their storage plans, `symmetric(bits)` the zero-point rule. Returns the
    rescaled input X / s, or None where the group is left as it is (part of it stays float, or
    the producer of its input cannot absorb 1/s)."""
    if not all(isinstance(k, tuple) for k in kinds):
        return None
    bits, g = min(kinds)  # search for the coarsest member
    if stage == "o_in" and t["attn.v.weight"].shape[0] != t["attn.o.weight"].shape[1]:
        return None
    if stage == "res_in" or (stage == "down_in" and not gated):
        return None
    s = search_scales(X, [t[f"{n}.weight"] for n in names], bits, g, symmetric(bits), seed=seed)
    if not fold(t, stage, names, s, gated):
        return None
    return X / s
