"""SliceGPT (Ashkboos et al., 2024, arXiv 2401.15024): delete the residual stream's least-used
directions, so every matrix that reads or writes the residual gets narrower.

A transformer whose norms are weightless RMSNorms computes the same function when the residual
stream is rotated by any orthogonal Q (RMSNorm(xQ) = RMSNorm(x)Q): rotate what writes into the
stream (embedding, attention output, MLP down) by Q and what reads from it (q/k/v, gate/up,
head) by Q^T. Choose Q per block from the principal components of the block's input on
calibration text (float64), then keep only the first d columns: matrices shrink by
(D - d) rows or columns. The basis may change from block to block; a block's residual path
then carries the shortcut Q_l^T Q_{l+1} (stored as layers.i.shortcut.weight, quantizable).

Making the norms weightless: LayerNorm families (phi, opt, gpt2) first subtract the mean in
every writer (embedding rows, attention and MLP output rows), so the stream has zero mean and
LayerNorm equals RMSNorm; every norm's scale and bias fold into the linears that read it. A
sliced RMSNorm averages over d instead of D dims; its weight sqrt(D/d) restores the scale
(the epsilon effectively shrinks by d/D: negligible). At --slice 0 every step is exact
(tested against transformers for every family).

One basis per block (its input); the MLP reads the attention's sum in that basis and writes in
the next block's. SliceGPT also re-bases between attention and MLP (two shortcuts a block);
one costs half the extra parameters (d^2 a block).
"""
from __future__ import annotations

import numpy as np

from ..quantize.layers import embed_tokens
from ..stream import Step, Stream


def sliced_width(D: int, fraction: float) -> int:
    """Kept width: D minus the fraction, rounded down to a multiple of 8 (kernel-friendly)."""
    if fraction == 0:
        return D
    d = int(round(D * (1 - fraction)))
    return max(8, d - d % 8)


def principal_basis(cov: np.ndarray, d: int) -> np.ndarray:
    """The d leading eigenvectors (D, d) of a symmetric PSD matrix, largest eigenvalue first."""
    vals, vecs = np.linalg.eigh(cov)
    return vecs[:, np.argsort(vals)[::-1][:d]]


def covariance(x: np.ndarray) -> np.ndarray:
    """x^T x over every token (float64), x (..., D)."""
    xf = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return xf.T @ xf


def fold_norm(t: dict, norm: str, readers: list[str], width: int, scale: float):
    """Fold a norm's weight (and bias) into the linears reading it; the norm becomes weightless
    (`width` entries of `scale`)."""
    w = t.pop(norm + ".weight").astype(np.float64)
    b = t.pop(norm + ".bias", None)
    for r in readers:
        W = t[r + ".weight"].astype(np.float64)
        if b is not None:
            t[r + ".bias"] = (t[r + ".bias"] if r + ".bias" in t else 0) + (W @ b).astype(np.float32)
        t[r + ".weight"] = W * w[None, :]
    t[norm + ".weight"] = np.full(width, scale, np.float32)


def center_rows(t: dict, lin: str):
    """Make a linear's output zero-mean over its output dims (LayerNorm -> RMSNorm)."""
    W = t[lin + ".weight"].astype(np.float64)
    t[lin + ".weight"] = W - W.mean(axis=0, keepdims=True)
    if lin + ".bias" in t:
        b = t[lin + ".bias"].astype(np.float64)
        t[lin + ".bias"] = (b - b.mean()).astype(np.float32)


def rotate_out(t: dict, lin: str, Q: np.ndarray):
    """Output rows into the basis Q (D, d): W <- Q^T W, b <- Q^T b."""
    t[lin + ".weight"] = (Q.T @ t[lin + ".weight"].astype(np.float64)).astype(np.float32)
    if lin + ".bias" in t:
        t[lin + ".bias"] = (Q.T @ t[lin + ".bias"].astype(np.float64)).astype(np.float32)


class SliceStep(Step):
    name = "slice"

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.Q = None  # (D, d) basis of the current block's input
        self.center = False
        self.head_source = None  # a tied head's matrix, kept before the embedding is rotated

    def options(self) -> dict:
        return {"fraction": self.fraction, "width": int(self.Q.shape[1]) if self.Q is not None else None}

    def pre(self, s: Stream, pre: dict):
        E = pre["embed.weight"]
        self.D = E.shape[1]
        self.d = sliced_width(self.D, self.fraction)
        self.center = s.model["norm"] == "layer"
        if s.model["tied_head"]:
            self.head_source = E
        for name in ("embed.weight", "pos_embed.weight"):
            if name in pre and self.center:
                pre[name] = pre[name] - pre[name].mean(axis=1, keepdims=True)
        ids = s.ids
        pos = pre.get("pos_embed.weight")
        x0 = embed_tokens(s.spec, pre["embed.weight"][ids.ravel()].reshape(ids.shape + (-1,)), pos, ids)
        self.Q = principal_basis(covariance(x0), self.d)
        Q32 = self.Q.astype(np.float32)
        for name in ("embed.weight", "pos_embed.weight"):
            if name in pre:
                pre[name] = pre[name] @ Q32
        s.model["norm"] = "rms"

    def layer(self, s: Stream, j: int, t: dict, x):
        Q, D = self.Q, self.D
        parallel = s.model["parallel_block"]
        gated = "mlp.gate.weight" in t
        mlp_readers = ["mlp.gate", "mlp.up"] if gated else ["mlp.up"]
        if self.center:
            for lin in ("attn.o", "mlp.down"):
                center_rows(t, lin)
        d_in = Q.shape[1]
        c_in = np.sqrt(D / d_in)
        fold_norm(t, "attn_norm", ["attn.q", "attn.k", "attn.v"] + (mlp_readers if parallel else []), d_in, c_in)
        if not parallel:
            fold_norm(t, "mlp_norm", mlp_readers, d_in, c_in)
        for r in ["attn.q", "attn.k", "attn.v"] + mlp_readers:
            t[r + ".weight"] = (t[r + ".weight"] @ Q).astype(np.float32)
        if not parallel:
            rotate_out(t, "attn.o", Q)
        for lin in ("attn.o", "mlp.down"):  # still in the original basis: float32 for the run
            t[lin + ".weight"] = t[lin + ".weight"].astype(np.float32)
        # Run the block with its output in the full basis (the residual mapped back by Q) ...
        t["shortcut.weight"] = Q.astype(np.float32)
        y = s.runner(j, t).run(x)
        # ... and re-base it onto the principal directions of that output.
        Q_next = principal_basis(covariance(y), self.d)
        for lin in (["attn.o"] if parallel else []) + ["mlp.down"]:
            rotate_out(t, lin, Q_next)
        t["shortcut.weight"] = (Q_next.T @ Q).astype(np.float32)
        self.Q = Q_next
        return (y.astype(np.float64) @ Q_next).astype(np.float32)

    def to_student(self, y: np.ndarray) -> np.ndarray:
        """A residual of the original model (..., D) in the sliced basis of the block just done
        (healing's block targets): centered where LayerNorm was made RMSNorm, then projected."""
        if self.center:
            y = y - y.mean(axis=-1, keepdims=True)
        return (y.astype(np.float64) @ self.Q).astype(np.float32)

    def post(self, s: Stream, post: dict, x):
        W = self.head_source if self.head_source is not None else post["head.weight"]
        w = post.pop("final_norm.weight").astype(np.float64)
        b = post.pop("final_norm.bias", None)
        if b is not None:
            bias = W.astype(np.float64) @ b
            post["head.bias"] = (post["head.bias"] + bias if "head.bias" in post else bias).astype(np.float32)
        post["head.weight"] = ((W.astype(np.float64) * w[None, :]) @ self.Q).astype(np.float32)
        post["final_norm.weight"] = np.full(self.Q.shape[1], np.sqrt(self.D / self.Q.shape[1]), np.float32)
        s.model["tied_head"] = False
        self.head_source = None
