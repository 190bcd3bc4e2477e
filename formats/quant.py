"""Group-wise integer codes (see spec.py): packing, the dequantization formula, and RTN.

Writer, reader and converter all use these, so packing and unpacking can never disagree.

Codes are packed as one little-endian bit stream along the last axis, low bits first. For
2, 4 and 8 bits that is exactly onnxruntime's MatMulNBits byte layout (code i of a byte sits
at bits [i*b, (i+1)*b)); for 3 bits, every 8 codes fill 3 bytes (code i at bits [3i, 3i+3) of
the 24-bit little-endian word), so 3-bit files cost 3 bits a weight, not 4.
"""
from __future__ import annotations

import numpy as np

from .spec import n_groups

# Clip ratios tried by the range search: the group's [min, max] (or signed peak) is shrunk by
# each factor and the one with the least (importance-weighted) squared error wins per group.
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes along the last axis, low bits first: (..., L) -> (..., ceil(L*bits/8)) uint8."""
    codes = np.asarray(codes).astype(np.uint8)
    if bits == 8:
        return codes
    L = codes.shape[-1]
    lead = codes.shape[:-1]
    nbytes = -(-L * bits // 8)
    per = 8 if bits == 3 else 8 // bits  # codes per packing unit (3 bytes for 3-bit, 1 byte otherwise)
    pad = -L % per
    if pad:
        codes = np.concatenate([codes, np.zeros(lead + (pad,), np.uint8)], axis=-1)
    c = codes.reshape(*lead, -1, per)
    if bits == 3:
        word = np.zeros(c.shape[:-1], np.uint32)
        for i in range(8):
            word |= c[..., i].astype(np.uint32) << np.uint32(3 * i)
        out = np.stack([(word >> np.uint32(8 * j)).astype(np.uint8) for j in range(3)], axis=-1)
    else:
        out = np.zeros(c.shape[:-1], np.uint8)
        for i in range(per):
            out |= c[..., i] << np.uint8(i * bits)
    return out.reshape(*lead, -1)[..., :nbytes]


def unpack_codes(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of pack_codes: (..., B) uint8 -> (..., count) uint8 codes (count defaults to B*8/bits)."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed if count is None else packed[..., :count]
    lead = packed.shape[:-1]
    if bits == 3:
        pad = -packed.shape[-1] % 3
        if pad:
            packed = np.concatenate([packed, np.zeros(lead + (pad,), np.uint8)], axis=-1)
        b = packed.reshape(*lead, -1, 3).astype(np.uint32)
        word = b[..., 0] | (b[..., 1] << np.uint32(8)) | (b[..., 2] << np.uint32(16))
        parts = [((word >> np.uint32(3 * i)) & np.uint32(7)).astype(np.uint8) for i in range(8)]
    else:
        mask = np.uint8((1 << bits) - 1)
        parts = [(packed >> np.uint8(i * bits)) & mask for i in range(8 // bits)]
    out = np.stack(parts, axis=-1).reshape(*lead, -1)
    if count is None:
        count = packed.shape[-1] * 8 // bits if bits != 3 else out.shape[-1]
    return out[..., :count]


def pad_to_groups(w: np.ndarray, group_size: int) -> np.ndarray:
    """(N, K) -> (N, G, group_size) with zero padding of K."""
    n, k = w.shape
    g = n_groups(k, group_size)
    if g * group_size != k:
        w = np.pad(w, ((0, 0), (0, g * group_size - k)))
    return w.reshape(n, g, group_size)


def encode(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group_size: int) -> dict:
    """Integer codes (N, K), f16 scales (N, G), integer zero points (N, G) or None -> spec parts.

    K is padded with the group's zero point (value 0) to whole groups.
    """
    n, k = codes.shape
    g = n_groups(k, group_size)
    zp = np.full((n, g), 1 << (bits - 1), np.uint8) if zeros is None else np.asarray(zeros, np.uint8)
    full = np.repeat(zp, group_size, axis=1)  # (N, G*g) default = zero point
    full[:, :k] = codes
    out = {"data": pack_codes(full.reshape(n, g, group_size), bits), "scales": np.asarray(scales, np.float16)}
    if zeros is not None:
        out["zeros"] = pack_codes(zp, bits)
    return out


def decode(parts: dict, shape: tuple[int, int], bits: int, group_size: int, rows=None):
    """Spec parts -> (codes (n, K) uint8, scales (n, G) f32, zeros (n, G) f32); `rows` selects rows first."""
    data, scales, zeros = parts["data"], parts["scales"], parts.get("zeros")
    if rows is not None:
        data, scales = data[rows], scales[rows]
        zeros = zeros[rows] if zeros is not None else None
    g = scales.shape[-1]
    codes = unpack_codes(data, bits, group_size).reshape(data.shape[0], -1)[:, : shape[1]]
    if zeros is None:
        zp = np.full(scales.shape, 1 << (bits - 1), np.float32)
    else:
        zp = unpack_codes(zeros, bits, g).astype(np.float32)
    return codes, scales.astype(np.float32), zp


def dequantize(parts: dict, shape: tuple[int, int], bits: int, group_size: int, rows=None) -> np.ndarray:
    """Parts of a quantized tensor -> float32 (N, K); `rows` selects rows first (embedding gather).

    W[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g]
    """
    data, scales, zeros = parts["data"], parts["scales"], parts.get("zeros")
    if rows is not None:
        data, scales = data[rows], scales[rows]
        zeros = zeros[rows] if zeros is not None else None
    g = scales.shape[-1]
    codes = unpack_codes(data, bits, group_size).astype(np.float32)  # (n, G, g)
    if zeros is None:
        zp = np.float32(1 << (bits - 1))
    else:
        zp = unpack_codes(zeros, bits, g).astype(np.float32)[..., None]
    w = (codes - zp) * scales.astype(np.float32)[..., None]
    return w.reshape(w.shape[0], -1)[:, : shape[1]]


def widen_q3_to_q4(parts: dict) -> dict:
    """q3 parts -> equivalent q4 parts (MatMulNBits 4-bit layout), for kernels that have no 3-bit path.

    Asymmetric: codes and zero points keep their values. Symmetric (implied zero point 4):
    codes are shifted by +4 so q4's implied zero point 8 gives the same weights.
    Costs 4/3 of the code bytes in RAM (the file on disk stays 3-bit).
    """
    data = parts["data"]
    n, g, nb = data.shape
    codes = unpack_codes(data, 3, nb * 8 // 3)
    out = {"scales": parts["scales"]}
    if "zeros" in parts:
        zp = unpack_codes(parts["zeros"], 3, g)
        out["zeros"] = pack_codes(zp, 4)
    else:
        codes = codes + np.uint8(4)
    out["data"] = pack_codes(codes, 4)
    return out


# -- round to nearest with a searched clipping range ------------------------------------------
def find_params(wg: np.ndarray, bits: int, symmetric: bool, importance: np.ndarray | None = None,
                grid=CLIP_GRID, valid: np.ndarray | None = None):
    """Per-group scale (f16) and zero point for groups wg (..., g), choosing the clip ratio that
    minimizes the (importance-weighted) squared error. Returns (scale f16 (...), zero int or None)."""
    wg = np.asarray(wg, np.float32)
    qmax = (1 << bits) - 1
    imp = np.ones(wg.shape[-1], np.float32) if importance is None else np.asarray(importance, np.float32)
    if valid is not None:
        imp = imp * valid
    best_err = best_s = best_z = None
    if symmetric:
        zp = 1 << (bits - 1)
        idx = np.abs(wg).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(wg, idx, axis=-1)[..., 0]
    else:
        lo0 = np.minimum(wg.min(axis=-1), 0)
        hi0 = np.maximum(wg.max(axis=-1), 0)
    for clip in grid:
        if symmetric:
            # As llama.cpp's Q4_0/Q8_0: the largest-magnitude value maps to code 0, so the scale
            # may be negative and the full code range [0, qmax] is used.
            s = _f16_scale(peak * clip / -zp)
            z = None
            sf = s.astype(np.float32)[..., None]
            q = np.clip(np.rint(wg / sf) + zp, 0, qmax)
            err = (((q - zp) * sf - wg) ** 2 * imp).sum(-1)
        else:
            lo, hi = lo0 * clip, hi0 * clip
            s = _f16_scale((hi - lo) / qmax)
            sf = s.astype(np.float32)
            z = np.clip(np.rint(-lo / sf), 0, qmax)
            q = np.clip(np.rint(wg / sf[..., None]) + z[..., None], 0, qmax)
            err = (((q - z[..., None]) * sf[..., None] - wg) ** 2 * imp).sum(-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            if z is not None:
                best_z = np.where(better, z, best_z)
    return best_s, (None if symmetric else best_z.astype(np.uint8))


def _f16_scale(s):
    s = np.asarray(s, np.float32).astype(np.float16)
    return np.where((s == 0) | ~np.isfinite(s), np.float16(1.0), s)


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero, bits: int) -> np.ndarray:
    """Codes for w (..., L) with per-row scale (...) and zero (...) (None = symmetric)."""
    zp = np.float32(1 << (bits - 1)) if zero is None else np.asarray(zero, np.float32)[..., None]
    return np.clip(np.rint(w / scale.astype(np.float32)[..., None]) + zp, 0, (1 << bits) - 1)


def quantize_rtn(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True, clip: float | None = None,
                 importance: np.ndarray | None = None, search: bool = True, rows_per_chunk: int = 8192,
                 grid=CLIP_GRID) -> dict:
    """Round-to-nearest group-wise quantization of a float (N, K) matrix into spec parts.

    The clipping range is searched per group over CLIP_GRID (`search=False` or a fixed `clip`
    keeps one ratio). `importance` (K,) weights the error per input column (e.g. mean x^2 on
    calibration data, as llama.cpp's importance matrix).
    """
    w = np.asarray(w, np.float32)
    n, k = w.shape
    g = n_groups(k, group_size)
    grid = (clip,) if clip is not None else (grid if search else (1.0,))
    imp = None
    if importance is not None:
        imp = pad_to_groups(np.asarray(importance, np.float32)[None], group_size)[0]  # (G, g)
        imp = np.maximum(imp, imp.mean() * 1e-3 + 1e-12)
    valid = pad_to_groups(np.ones((1, k), np.float32), group_size)[0]  # (G, g): 0 on padding
    codes = np.empty((n, g * group_size), np.uint8)
    scales = np.empty((n, g), np.float16)
    zeros = None if symmetric else np.empty((n, g), np.uint8)
    for r0 in range(0, n, rows_per_chunk):
        wg = pad_to_groups(w[r0:r0 + rows_per_chunk], group_size)
        s, z = find_params(wg, bits, symmetric, imp, grid, valid)
        codes[r0:r0 + len(wg)] = quantize_codes(wg, s, z, bits).reshape(len(wg), -1)
        scales[r0:r0 + len(wg)] = s
        if zeros is not None:
            zeros[r0:r0 + len(wg)] = z
    return encode(codes[:, :k], scales, zeros, bits, group_size)
