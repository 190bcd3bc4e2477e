"""GPTQ's inverse-Hessian factor, built in place (scipy LAPACK, K >= 512) or by copies (small K):
U is upper triangular and U^T U is the inverse of the damped Hessian in activation order,
checked against a float64 inverse; dead inputs are neutralized."""
from __future__ import annotations

import numpy as np
import pytest

from llmpack.converter.quantize.gptq import HessianFactor


@pytest.mark.parametrize("k,n", [(96, 400), (640, 2000), (640, 300)])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("from_inputs", [True, False])
def test_factor_inverts_damped_hessian(k, n, act_order, from_inputs):
    rng = np.random.default_rng(k + n)
    X = rng.standard_normal((n, k)).astype(np.float32) * rng.gamma(1, 1, k).astype(np.float32)
    X[:, 5] = 0  # a dead input
    H = X.astype(np.float64).T @ X.astype(np.float64) / n
    f = HessianFactor.from_inputs(X, act_order=act_order) if from_inputs else HessianFactor(H, act_order=act_order)
    assert f.dead[5] and f.dead.sum() == 1
    Hd = H.copy()
    Hd[5, 5] = 1.0  # a dead input's diagonal counts as 1 (ordering, damping)
    if act_order:
        d = np.diag(Hd)[f.perm]
        assert np.all(np.diff(d) <= 1e-5 * d[:-1])  # decreasing diag
    else:
        assert np.array_equal(f.perm, np.arange(k))
    Hp = Hd[np.ix_(f.perm, f.perm)] + f.damp * np.eye(k)
    U = f.U.astype(np.float64)
    assert np.abs(np.tril(f.U, -1)).max() <= 1e-6 * np.abs(f.U).max()  # upper triangular
    ref = np.linalg.inv(Hp)
    err = np.abs(U.T @ U - ref).max() / np.abs(ref).max()
    assert err < 2e-3, err
