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

from dataclasses import dataclass

import numpy as np

from llmpack.formats import quant
from llmpack.formats.spec import n_groups


class HessianFactor:
    """The upper Cholesky factor of the damped inverse Hessian, in activation order; shared by
    every linear that reads the same input (q/k/v, gate/up).

    Memory: one K x K float32 matrix. `from_inputs` builds H straight in the order the
    factorization needs (activation order, reversed) and factorizes and inverts it in place
    (LAPACK potrf/trtri through scipy, when installed), so the 7B shape's down projection
    (K = 18944: 1.4 GB a matrix) costs one matrix, not the six (two of them float64) that
    forming, permuting, reversing, factorizing and inverting copies took before.
    """

    def __init__(self, H: np.ndarray, act_order: bool = True, damp: float = 0.01):
        H = np.asarray(H)
        diag = np.diag(H).astype(np.float64)
        self._order(diag, act_order)
        pr = self.perm[::-1]
        self._factorize(lambda: np.array(H[np.ix_(pr, pr)], np.float32), diag, damp)

    @classmethod
    def from_inputs(cls, X: np.ndarray, act_order: bool = True, damp: float = 0.01) -> "HessianFactor":
        """The factor of H = X^T X / n for inputs X (n, K), without forming H in input order."""
        self = cls.__new__(cls)
        X = np.asarray(X, np.float32)
        n = len(X)
        diag = np.einsum("nk,nk->k", X, X, dtype=np.float64) / n
        self._order(diag, act_order)
        pr = self.perm[::-1]

        def build():
            if _lapack(len(pr)) is None:
                Xp = X[:, pr]
                H = Xp.T @ Xp
                del Xp
                H *= np.float32(1.0 / n)
                return H
            # One triangle, accumulated in place over row chunks (BLAS syrk): no permuted copy
            # of X and no K x K product temporary. F's upper triangle is the one potrf reads.
            from scipy.linalg import blas

            F = np.zeros((len(pr), len(pr)), np.float32, order="F")
            for r0 in range(0, n, 1024):
                Xc = X[r0:r0 + 1024][:, pr]
                F = blas.ssyrk(np.float32(1.0 / n), Xc.T, beta=1.0, c=F, trans=0, lower=0, overwrite_c=1)
            return F.T  # C-ordered view; only its lower triangle (F's upper) is meaningful
        self._factorize(build, diag, damp)
        return self

    def _order(self, diag, act_order):
        self.dead = diag <= 0
        diag[self.dead] = 1.0
        self.importance = np.where(self.dead, 0.0, diag).astype(np.float32)
        self.perm = np.argsort(-diag, kind="stable") if act_order else np.arange(len(diag))
        self.invperm = np.argsort(self.perm)

    def _factorize(self, build_rev, diag, damp):
        """U from J Hp J (Hp: H in activation order, J: reversal), built by `build_rev()`.

        U = chol(H^-1, upper) without forming H^-1: with J Hp J = M M^T (M lower),
        Hp^-1 = (J M^-1 J)^T (J M^-1 J) and J M^-1 J is upper triangular.
        """
        k = len(diag)
        dead_rev = self.dead[self.perm[::-1]]
        lam = damp * float(diag.mean())
        for _ in range(8):
            rev = build_rev()  # float32, as the reference GPTQ
            d = rev.reshape(-1)[:: k + 1]  # the diagonal, a view
            d[dead_rev] = 1.0
            d += np.float32(lam)
            U = _inverse_cholesky_reversed(rev)
            if U is not None:
                break
            del rev
            lam = max(lam, 1e-8) * 10  # not positive definite at this damping (few tokens): damp more
        else:
            raise FloatingPointError("GPTQ: Hessian not positive definite even with heavy damping")
        if not np.isfinite(U.sum(dtype=np.float64)):
            raise FloatingPointError("GPTQ: inverse Hessian factor is not finite")
        self.U = U
        self.damp = lam


def _inverse_cholesky_reversed(A: np.ndarray):
    """J M^-1 J for A = M M^T (A float32, C-contiguous, symmetric; overwritten), or None if A is
    not positive definite. In place with scipy's LAPACK (which reads only A's lower triangle);
    otherwise with two temporary copies."""
    lapack = _lapack(len(A))
    if lapack is not None:
        # A.T is A's buffer seen in Fortran order (and equal to A). potrf upper there gives R with
        # A = R^T R (so M = R^T), trtri gives R^-1; the C-order buffer then reads (R^-1)^T = M^-1.
        f = A.T
        c, info = lapack.spotrf(f, lower=0, clean=1, overwrite_a=1)
        if info != 0:
            return None
        c, info = lapack.strtri(c, lower=0, overwrite_c=1)
        if info != 0 or not np.shares_memory(c, A):
            return None if info != 0 else np.ascontiguousarray(c.T[::-1, ::-1])
        _reverse_in_place(A.reshape(-1))  # flat reversal of a C-order square = J . J
        return A
    try:
        M = np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        return None
    return np.ascontiguousarray(_tri_inv_lower(M)[::-1, ::-1], np.float32)


def _lapack(k: int):
    """scipy's LAPACK module for a K x K factorization in place, or None (small K, or no scipy)."""
    if k < 512:
        return None
    try:
        from scipy.linalg import lapack
    except ImportError:
        return None
    return lapack


def _reverse_in_place(a: np.ndarray, chunk: int = 1 << 22):
    n = a.size
    for i in range(0, n // 2, chunk):
        j = min(i + chunk, n // 2)
        tmp = a[i:j].copy()
        a[i:j] = a[n - j:n - i][::-1]
        a[n - j:n - i] = tmp[::-1]


def _tri_inv_lower(M: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix (a triangular solve: a third of a general inverse)."""
    if len(M) < 512:
        return np.linalg.inv(M)
    import torch

    t = torch.from_numpy(M)
    return torch.linalg.solve_triangular(t, torch.eye(len(M), dtype=t.dtype), upper=False).numpy()


def gptq_quantize(W: np.ndarray, f: HessianFactor, bits: int, group_size: int, symmetric: bool,
                  block: int = 32, rows_per_chunk: int | None = None, grid=quant.CLIP_GRID,
                  dequantized: bool = True, prune=None):
    """Quantize W (N, K). Returns (spec parts, dequantized W (N, K) float32, or None when not
    `dequantized`: the head's 152k x 3584 would be 2.2 GB nobody reads).

    `prune` (SparseGPT, see sparsity.sparsegpt_selector): prune(cur (L, m), diag U (L,)) gives
    the kept mask of L columns from their current values: unstructured, of each block of columns
    when the block starts; 2:4, of a group's quads (in K order) when its scale is fixed. Pruned
    weights get the zero point's code (value exactly 0) and their error is propagated like a
    rounding error.

    Works on W transposed (K, N) so that a column of W is a contiguous row in memory; each chunk
    of rows is quantized by _quantize_chunk and packed as soon as it is done (no (N, K) code
    matrix). Chunks default to ~64 MB of float32 work (K = 18944: 885 rows; K = 3584: 4681), so
    the 7B down projection's working copies stay near 200 MB instead of three 271 MB arrays.
    """
    if rows_per_chunk is None:
        rows_per_chunk = max(256, min(8192, (1 << 24) // max(W.shape[1], 1)))
    W = np.asarray(W, np.float32)
    n, k = W.shape
    G = n_groups(k, group_size)
    order = _ColumnOrder.of(f, group_size)
    data_all = np.empty((n, G, -(-group_size * bits // 8)), np.uint8)
    scales_all = np.empty((n, G), np.float16)
    zeros_all = None if symmetric else np.empty((n, G), np.uint8)
    deq = np.empty((n, k), np.float32) if dequantized else None
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        Wt = np.ascontiguousarray(W[r0:r1].T[f.perm])  # (K, m), permuted column order
        Wt[f.dead[f.perm]] = 0
        codes, Qt, s16, zeros = _quantize_chunk(Wt, f.U, order, G, bits, symmetric, block, grid, prune)
        if deq is not None:
            deq[r0:r1] = Qt[f.invperm].T
        del Qt
        z8 = None if zeros_all is None else zeros.T.astype(np.uint8)
        data_all[r0:r1] = quant.encode(codes[f.invperm].T, s16.T, z8, bits, group_size)["data"]
        scales_all[r0:r1] = s16.T
        if zeros_all is not None:
            zeros_all[r0:r1] = z8
    parts = {"data": data_all, "scales": scales_all}
    if zeros_all is not None:
        parts["zeros"] = quant.pack_codes(zeros_all, bits)
    return parts, deq


@dataclass(frozen=True)
class _ColumnOrder:
    """What GPTQ's column loop needs of the factor's column order, computed once per matrix."""

    perm: np.ndarray  # source column of each permuted position
    col_group: np.ndarray  # group of each permuted position
    group_pos: list  # permuted positions of each group, ascending
    importance: np.ndarray  # per source column, normalized to mean 1 (+ 1e-3)
    diag_u: np.ndarray  # diagonal of the inverse-Hessian factor U

    @classmethod
    def of(cls, f: HessianFactor, group_size: int) -> "_ColumnOrder":
        k = len(f.perm)
        group_pos = [np.sort(f.invperm[j * group_size:min(k, (j + 1) * group_size)])
                     for j in range(n_groups(k, group_size))]
        return cls(f.perm, f.perm // group_size, group_pos,
                   f.importance / max(float(f.importance.mean()), 1e-30) + 1e-3, np.diag(f.U))


def _quantize_chunk(Wt: np.ndarray, U: np.ndarray, order: _ColumnOrder, G: int, bits: int, symmetric: bool,
                    block: int, grid, prune):
    """GPTQ's column loop over one chunk of rows, Wt (K, m) in permuted column order (updated in
    place by the error feedback). Returns (codes (K, m) uint8, dequantized Qt (K, m) float32,
    f16 scales (G, m), zero points (G, m) float32).

    One function on purpose: the loop shares a dozen arrays (the block's weights and errors, the
    group scales fixed so far, the SparseGPT mask) that helpers would pass back and forth on the
    hottest path of the converter. A group's scale is fixed when its first column (in GPTQ's
    order) comes up, from the current values of all its columns: those in this block as updated
    so far, those in later blocks with this block's pending error applied."""
    k, m = Wt.shape
    perm, col_group, group_pos, imp_all, diag_u = (order.perm, order.col_group, order.group_pos, order.importance,
                                                   order.diag_u)
    qmax = float((1 << bits) - 1)
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
                        o = np.argsort(perm[pos])
                        keep[pos[o]] = prune(cur[o], diag_u[pos[o]])
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
    return codes, Qt, s16, zeros
