"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, pushing each column's
rounding error onto the not-yet-quantized columns through the inverse Hessian of the layer's
reconstruction loss ||X W^T - X Q^T||^2, H = X^T X / n over calibration inputs X.

Implemented as in the reference code: dead inputs zeroed, damping (a fraction of mean diag H),
activation order (columns by decreasing diag H), lazy batch updates (the rest of W is updated
once per block of columns; blocks of 32 rather than the reference 128, since on a CPU each
column's element-wise update of the rest of its block costs more than the block matmul).
Everything in float32, as the reference. Groups stay contiguous along K in the stored layout:
with activation order a group's scale and zero point are fixed when its first column comes up (from the then-current, error-updated values of all its columns), and every column
uses its own group's parameters. Rows are independent, so large matrices (the head) run in
row chunks to bound memory.
"""
from __future__ import annotations

import numpy as np

from llmpack.formats import quant
from llmpack.formats.spec import n_groups


class HessianFactor:
    """The upper Cholesky factor of the damped inverse Hessian, in activation order; shared by
    every linear that reads the same input (q/k/v, gate/up)."""

    def __init__(self, H: np.ndarray, act_order: bool = True, damp: float = 0.01):
        H = np.array(H, np.float64)
        k = H.shape[0]
        diag = np.diag(H).copy()
        self.dead = diag <= 0
        H[self.dead, self.dead] = 1.0
        diag[self.dead] = 1.0
        self.importance = np.where(self.dead, 0.0, np.diag(H)).astype(np.float32)
        self.perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
        self.invperm = np.argsort(self.perm)
        Hp = H[self.perm][:, self.perm]
        lam = damp * float(diag.mean())
        # U = chol(H^-1, upper) without forming H^-1: with J the reversal permutation and
        # J H J = M M^T (M lower), H^-1 = (J M^-1 J)^T (J M^-1 J) and J M^-1 J is upper triangular.
        rev = np.ascontiguousarray(Hp[::-1, ::-1], np.float32)  # float32, as the reference GPTQ
        for _ in range(8):
            try:
                M = np.linalg.cholesky(rev + np.float32(lam) * np.eye(k, dtype=np.float32))
                break
            except np.linalg.LinAlgError:
                lam = max(lam, 1e-8) * 10  # not positive definite at this damping (few tokens): damp more
        self.U = np.ascontiguousarray(_tri_inv_lower(M)[::-1, ::-1], np.float32)
        if not np.isfinite(self.U).all():
            raise FloatingPointError("GPTQ: inverse Hessian factor is not finite")
        self.damp = lam


def _tri_inv_lower(M: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix (a triangular solve: a third of a general inverse)."""
    if len(M) < 512:
        return np.linalg.inv(M)
    import torch

    t = torch.from_numpy(M)
    return torch.linalg.solve_triangular(t, torch.eye(len(M), dtype=t.dtype), upper=False).numpy()


def gptq_quantize(W: np.ndarray, f: HessianFactor, bits: int, group_size: int, symmetric: bool,
                  block: int = 32, rows_per_chunk: int = 8192, grid=quant.CLIP_GRID, prune=None):
    """Quantize W (N, K). Returns (spec parts, dequantized W (N, K) float32).

    `prune` (SparseGPT, see sparsity.sparsegpt_selector): prune(cur (L, m), diag U (L,)) gives
    the kept mask of L columns from their current values: unstructured, of each block of columns
    when the block starts; 2:4, of a group's quads (in K order) when its scale is fixed. Pruned
    weights get the zero point's code (value exactly 0) and their error is propagated like a
    rounding error.

    Works on W transposed (K, N) so that a column of W is a contiguous row in memory.
    """
    W = np.asarray(W, np.float32)
    n, k = W.shape
    G = n_groups(k, group_size)
    perm, U = f.perm, f.U
    col_group = perm // group_size  # group of each permuted position
    group_pos = [np.sort(f.invperm[j * group_size:min(k, (j + 1) * group_size)]) for j in range(G)]
    imp_all = f.importance / max(float(f.importance.mean()), 1e-30) + 1e-3
    qmax = float((1 << bits) - 1)
    codes_all = np.empty((n, k), np.uint8)
    scales_all = np.empty((n, G), np.float16)
    zeros_all = None if symmetric else np.empty((n, G), np.uint8)
    deq = np.empty((n, k), np.float32)
    dead_p = f.dead[perm]
    diag_u = np.diag(U)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        m = r1 - r0
        Wt = np.ascontiguousarray(W[r0:r1].T[perm])  # (K, m), permuted column order
        Wt[dead_p] = 0
        codes = np.empty((k, m), np.uint8)
        Qt = np.empty((k, m), np.float32)
        scales = np.empty((G, m), np.float32)
        zeros = np.full((G, m), float(1 << (bits - 1)), np.float32)
        s16 = np.empty((G, m), np.float16)
        done = np.zeros(G, bool)
        keep = None if prune is None else np.ones((k, m), bool)
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            W1 = Wt[i1:i2].copy()
            Err1 = np.zeros((i2 - i1, m), np.float32)
            U1 = U[i1:i2, i1:i2]
            if keep is not None and prune.pattern != "2:4":  # unstructured: mask of the block, chosen now
                keep[i1:i2] = prune(W1, diag_u[i1:i2])
            for ii in range(i2 - i1):
                i = i1 + ii
                j = col_group[i]
                if not done[j]:
                    pos = group_pos[j]
                    inblk = pos < i2
                    cur = np.empty((len(pos), m), np.float32)
                    cur[inblk] = W1[pos[inblk] - i1]
                    out = pos[~inblk]
                    if len(out):
                        cur[~inblk] = Wt[out] - U[i1:i, out].T @ Err1[:ii]
                    imp = imp_all[perm[pos]]
                    if keep is not None:  # SparseGPT: the group's scale from its kept weights
                        if prune.pattern == "2:4":  # the group's quads, in K order, chosen now
                            order = np.argsort(perm[pos])
                            keep[pos[order]] = prune(cur[order], diag_u[pos[order]])
                        cur *= keep[pos]  # (unstructured: masks of later blocks not chosen yet, all True)
                        imp = imp[None, :] * keep[pos].T
                    sc, z = quant.find_params(cur.T, bits, symmetric, imp, grid)
                    s16[j] = sc
                    scales[j] = sc.astype(np.float32)
                    if z is not None:
                        zeros[j] = z
                    done[j] = True
                w = W1[ii]
                sj, zj = scales[j], zeros[j]
                c = np.rint(w / sj)
                c += zj
                np.clip(c, 0.0, qmax, out=c)
                if keep is not None:
                    c = np.where(keep[i], c, zj)
                codes[i] = c
                q = (c - zj) * sj
                Qt[i] = q
                err = (w - q) / U1[ii, ii]
                W1[ii:] -= U1[ii, ii:, None] * err[None, :]
                Err1[ii] = err
            if i2 < k:
                Wt[i2:] -= U[i1:i2, i2:].T @ Err1
        codes_all[r0:r1] = codes[f.invperm].T
        deq[r0:r1] = Qt[f.invperm].T
        scales_all[r0:r1] = s16.T
        if zeros_all is not None:
            zeros_all[r0:r1] = zeros.T.astype(np.uint8)
    parts = quant.encode(codes_all, scales_all, zeros_all, bits, group_size)
    return parts, deq
