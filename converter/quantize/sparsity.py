"""Which weights to prune (--sparsity): the option, Wanda's and SparseGPT's selection rules.

Two patterns, each with a storage type in which the file really shrinks (formats/sparse.py):
unstructured (`--sparsity 0.5`: any fraction in (0, 1); bitmask + kept codes, q{b}m) and 2:4
(`--sparsity 2:4`: 2 of every 4 consecutive weights along the input dim; q{b}s24). Other N:M
ratios have no storage type and are refused. Only the decoder layers' linears are pruned; the
embedding and the head stay dense (they are one matrix each and the most sensitive).

- Wanda (Sun et al., 2023, arXiv 2306.11695), with --method rtn/awq: score |W_ij| * ||x_j||
  (x_j the j-th input feature over the calibration tokens), pruned per output row (each row
  loses exactly round(fraction * K) weights) or per quad for 2:4; the kept weights are then
  quantized as usual.
- SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774), with --method gptq/awq+gptq: inside
  GPTQ's column loop (quantize/gptq.py), in the natural column order as the reference (GPTQ's
  activation order is not used for pruned matrices). The mask is chosen from the then-current
  (error-updated) weights by w^2 / diag(U)^2 (U the Cholesky factor of H^-1, the reference's
  diag(Hinv)): unstructured, over each block of 32 columns when the block starts (all rows
  together, the reference's adaptive mask selection); 2:4, per quad when the group's scale is
  fixed. Pruned weights are set to exactly 0 and their error flows into the later columns like
  a rounding error; the group's scale is fit to its kept weights.

  Measured on a random 64x256 layer with correlated inputs (tests/test_sparse.py has a smaller
  one), layer-output error ||X (W - Q)^T|| at q4 g32: 50 % unstructured SparseGPT 3575 vs
  Wanda + RTN 4716; 2:4 5127 vs 6642. With activation order instead, unstructured SparseGPT was
  worse than Wanda (each block, in order of decreasing input energy, must lose the same
  fraction), so pruning keeps the natural order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmpack.formats.errors import LlmpackError

SUPPORTED = "a fraction strictly between 0 and 1 (unstructured, e.g. 0.5) or 2:4"


@dataclass(frozen=True)
class Sparsity:
    pattern: str  # "mask" (unstructured) or "2:4" — the formats.spec sparse pattern names
    fraction: float  # pruned fraction (0.5 for 2:4)


def parse(text) -> Sparsity | None:
    """--sparsity value -> Sparsity (None for no value); LlmpackError naming what is supported."""
    if text is None:
        return None
    s = str(text).strip()
    if ":" in s:
        if s.replace(" ", "") == "2:4":
            return Sparsity("2:4", 0.5)
        raise LlmpackError(f"--sparsity {s} is not supported; use {SUPPORTED}")
    try:
        f = float(s)
    except ValueError:
        raise LlmpackError(f"--sparsity {s!r} is not a sparsity; use {SUPPORTED}") from None
    if not 0 < f < 1:
        raise LlmpackError(f"--sparsity {s} is out of range; use {SUPPORTED}")
    return Sparsity("mask", f)


def applies(name: str) -> bool:
    """Pruned tensors: the decoder layers' weight matrices (embedding and head stay dense)."""
    return name.startswith("layers.")


def select(sp: Sparsity, score: np.ndarray, per_row: bool = True) -> np.ndarray:
    """Kept mask (N, K) bool for `score` (N, K), higher = more important.

    Unstructured: the lowest round(fraction * K) of each row (per_row), or the lowest
    round(fraction * N * K) of the whole block. 2:4: the 2 highest of every 4 consecutive
    columns (a last partial quad keeps at most 2 of its columns).
    """
    score = np.asarray(score, np.float64)
    n, k = score.shape
    if sp.pattern == "2:4":
        pad = -k % 4
        s4 = np.pad(score, ((0, 0), (0, pad)), constant_values=-np.inf).reshape(n, -1, 4)
        drop = np.argsort(s4, axis=-1, kind="stable")[..., :2]
        keep = np.ones(s4.shape, bool)
        np.put_along_axis(keep, drop, False, axis=-1)
        return keep.reshape(n, -1)[:, :k]
    if per_row:
        n_drop = int(round(sp.fraction * k))
        drop = np.argsort(score, axis=1, kind="stable")[:, :n_drop]
        keep = np.ones((n, k), bool)
        np.put_along_axis(keep, drop, False, axis=1)
        return keep
    n_drop = int(round(sp.fraction * n * k))
    keep = np.ones(n * k, bool)
    keep[np.argsort(score.ravel(), kind="stable")[:n_drop]] = False
    return keep.reshape(n, k)


def wanda_keep(sp: Sparsity, W: np.ndarray, x_sq_mean: np.ndarray) -> np.ndarray:
    """Wanda's kept mask for W (N, K) given the mean x_j^2 (K,) of its calibration inputs."""
    return select(sp, np.abs(W) * np.sqrt(np.asarray(x_sq_mean, np.float64))[None, :])


def sparsegpt_selector(sp: Sparsity | None):
    """For gptq_quantize(prune=...): cur (L, m) current weights of one group's columns (in
    column order, m output rows), d (L,) their diag(U) -> kept mask (L, m)."""
    if sp is None:
        return None

    def keep(cur: np.ndarray, d: np.ndarray) -> np.ndarray:
        score = (np.asarray(cur, np.float64) / np.asarray(d, np.float64)[:, None]) ** 2
        return select(sp, score.T, per_row=False).T

    keep.pattern = sp.pattern
    return keep
