"""Group-wise integer codes in onnxruntime's MatMulNBits layout (see spec.py).

Writer and reader both use these, so packing and unpacking can never disagree.
"""
from __future__ import annotations

import numpy as np

from .spec import n_groups


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes along the last axis, low bits first: (..., L) -> (..., L*bits/8) uint8."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per_byte)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= c[..., i] << np.uint8(i * bits)
    return out


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: (..., B) uint8 -> (..., B*8/bits) uint8 codes."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(i * bits)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)


def pad_to_groups(w: np.ndarray, group_size: int) -> np.ndarray:
    """(N, K) -> (N, G, group_size) with zero padding of K."""
    n, k = w.shape
    g = n_groups(k, group_size)
    if g * group_size != k:
        w = np.pad(w, ((0, 0), (0, g * group_size - k)))
    return w.reshape(n, g, group_size)


def dequantize(parts: dict, shape: tuple[int, int], bits: int, group_size: int, rows=None) -> np.ndarray:
    """Parts of a quantized tensor -> float32 (N, K); `rows` selects rows first (embedding gather)."""
    data, scales, zeros = parts["data"], parts["scales"], parts.get("zeros")
    if rows is not None:
        data, scales = data[rows], scales[rows]
        zeros = zeros[rows] if zeros is not None else None
    codes = unpack_codes(data, bits).astype(np.float32)  # (n, G, g)
    g = codes.shape[1]
    if zeros is None:
        zp = np.float32(1 << (bits - 1))
    else:
        zp = unpack_codes(zeros, bits)[:, :g].astype(np.float32)[..., None]
    w = (codes - zp) * scales.astype(np.float32)[..., None]
    return w.reshape(w.shape[0], -1)[:, : shape[1]]


def quantize_rtn(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True, clip: float = 1.0) -> dict:
    """Round-to-nearest group-wise quantization of a float (N, K) matrix into spec parts.

    `clip` shrinks the range (clip < 1 trades outlier error for resolution; converter searches it).
    """
    wg = pad_to_groups(np.asarray(w, np.float32), group_size)
    qmax = (1 << bits) - 1
    if symmetric:
        zp = 1 << (bits - 1)
        # As llama.cpp's Q4_0/Q8_0: the largest-magnitude value maps exactly to code 0, so the
        # scale may be negative and the full code range [0, qmax] is used.
        idx = np.abs(wg).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(wg, idx, axis=-1)[..., 0] * clip
        scale = (peak / -zp).astype(np.float16)
        scale = np.where(scale == 0, np.float16(1.0), scale)
        s = scale.astype(np.float32)[..., None]
        codes = np.clip(np.rint(wg / s) + zp, 0, qmax)
        out = {"data": pack_codes(codes, bits), "scales": scale}
    else:
        lo = np.minimum(wg.min(axis=-1), 0) * clip
        hi = np.maximum(wg.max(axis=-1), 0) * clip
        scale = (hi - lo) / qmax
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
        s = scale.astype(np.float32)
        zp = np.clip(np.rint(-lo / s), 0, qmax).astype(np.uint8)
        codes = np.clip(np.rint(wg / s[..., None]) + zp[..., None], 0, qmax)
        g = zp.shape[1]
        pad = (-g * bits) % 8 // bits
        zpp = np.pad(zp, ((0, 0), (0, pad))) if pad else zp
        out = {"data": pack_codes(codes, bits), "scales": scale, "zeros": pack_codes(zpp, bits)}
    return out
