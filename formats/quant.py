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
# Elements per block of the clip search: every candidate ratio is tried on one block while it sits
# in the core's 2 MB L2 cache, with preallocated temporaries (the previous whole-chunk version
# allocated ten fresh 100+ MB arrays per candidate and ran at memory speed: 70 ns a weight for 4
# bits, 4096x4096, on this machine's EPYC; blocked: see quantize_rtn's docstring).
SEARCH_BLOCK = 1 << 18


def find_params(wg: np.ndarray, bits: int, symmetric: bool, importance: np.ndarray | None = None,
                grid=CLIP_GRID, valid: np.ndarray | None = None, codes_out: np.ndarray | None = None):
    """Per-group scale (f16) and zero point for groups wg (..., g), choosing the clip ratio that
    minimizes the (importance-weighted) squared error. Returns (scale f16 (...), zero int or None).

    `importance` and `valid` broadcast against wg (e.g. (G, g) for wg (N, G, g)); ties go to the
    earlier ratio of `grid`. `codes_out` (uint8, wg's shape), if given, receives the codes
    (quantize_codes' values), computed block by block while the block is still in cache.
    """
    wg = np.asarray(wg, np.float32)
    lead, g = wg.shape[:-1], wg.shape[-1]
    imp = None
    if importance is not None or valid is not None:
        imp = np.ones(wg.shape[-1], np.float32) if importance is None else np.asarray(importance, np.float32)
        if valid is not None:
            imp = imp * valid
        imp = np.broadcast_to(np.sqrt(imp, dtype=np.float32), wg.shape)
    if wg.ndim == 1:
        s, z = _search_block(wg[None], bits, symmetric, None if imp is None else imp[None], grid,
                             None if codes_out is None else codes_out[None])
        return s[0], (None if z is None else z[0])
    # Blocks along the first axis; with (N, G, g) input a block is whole rows.
    row = int(np.prod(wg.shape[1:-1], dtype=np.int64)) * g
    step = max(1, SEARCH_BLOCK // max(row, 1))
    s_out = np.empty(lead, np.float16)
    z_out = None if symmetric else np.empty(lead, np.uint8)
    for r0 in range(0, wg.shape[0], step):
        blk = slice(r0, r0 + step)
        s, z = _search_block(wg[blk], bits, symmetric, None if imp is None else imp[blk], grid,
                             None if codes_out is None else codes_out[blk])
        s_out[blk] = s
        if z_out is not None:
            z_out[blk] = z
    return s_out, z_out


def _search_block(wg, bits, symmetric, sqrt_imp, grid, codes_out=None):
    """The clip search on one cache-sized block: (..., g) -> (scale f16 (...), zero uint8 or None)."""
    qmax = np.float32((1 << bits) - 1)
    if symmetric:
        zp = 1 << (bits - 1)
        # As llama.cpp's Q4_0/Q8_0: the largest-magnitude value maps to code 0, so the scale may
        # be negative and the full code range [0, qmax] is used.
        idx = np.abs(wg).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(wg, idx, axis=-1)[..., 0] / np.float32(-zp)
        off = np.float32(zp)
        lo_q, hi_q = -off, qmax - off
    else:
        lo0 = np.minimum(wg.min(axis=-1), 0)
        hi0 = np.maximum(wg.max(axis=-1), 0)
        span = (hi0 - lo0) / qmax
    t = np.empty_like(wg)
    err = np.empty(wg.shape[:-1], np.float32)
    best_err = best_s = best_z = None
    for clip in grid:
        clip = np.float32(clip)
        s = _f16_scale((peak if symmetric else span) * clip)
        sf = s.astype(np.float32)[..., None]
        if not symmetric:
            off = np.clip(np.rint(-(lo0 * clip)[..., None] / sf), 0, qmax)
            lo_q, hi_q = -off, qmax - off
        # code - off = clip(rint(w / s), -off, qmax - off); error = (code - off) * s - w, in place.
        np.divide(wg, sf, out=t)
        np.rint(t, out=t)
        np.maximum(t, lo_q, out=t)  # (np.clip with array bounds: 2.6x slower, measured)
        np.minimum(t, hi_q, out=t)
        t *= sf
        t -= wg
        if sqrt_imp is not None:
            t *= sqrt_imp
        np.einsum("...k,...k->...", t, t, out=err)
        if best_err is None:
            best_err, best_s = err.copy(), s
            best_z = None if symmetric else off[..., 0].copy()
        else:
            better = err < best_err
            np.copyto(best_err, err, where=better)
            best_s = np.where(better, s, best_s)
            if not symmetric:
                np.copyto(best_z, off[..., 0], where=better)
    if codes_out is not None:  # quantize_codes, in place on the cached block
        off = np.float32(1 << (bits - 1)) if symmetric else best_z[..., None]
        np.divide(wg, best_s.astype(np.float32)[..., None], out=t)
        np.rint(t, out=t)
        t += off
        np.maximum(t, 0, out=t)
        np.minimum(t, qmax, out=t)
        codes_out[...] = t
    return best_s, (None if symmetric else best_z.astype(np.uint8))


def _f16_scale(s):
    s = np.asarray(s, np.float32).astype(np.float16)
    return np.where((s == 0) | ~np.isfinite(s), np.float16(1.0), s)


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero, bits: int) -> np.ndarray:
    """Codes for w (..., L) with per-row scale (...) and zero (...) (None = symmetric)."""
    zp = np.float32(1 << (bits - 1)) if zero is None else np.asarray(zero, np.float32)[..., None]
    return np.clip(np.rint(w / scale.astype(np.float32)[..., None]) + zp, 0, (1 << bits) - 1)


def quantize_rtn(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True, clip: float | None = None,
                 importance: np.ndarray | None = None, search: bool = True, rows_per_chunk: int = 256,
                 grid=CLIP_GRID) -> dict:
    """Round-to-nearest group-wise quantization of a float (N, K) matrix into spec parts.

    The clipping range is searched per group over CLIP_GRID (`search=False` or a fixed `clip`
    keeps one ratio). `importance` (K,) weights the error per input column (e.g. mean x^2 on
    calibration data, as llama.cpp's importance matrix).

    Rows are processed `rows_per_chunk` at a time and packed straight into the output, so the
    extra memory is one chunk, not the (N, K) codes (the 7B shape's 152k x 3584 embedding: 0.5 GB
    of codes plus 0.5 GB of padded copy before). Measured on this machine (2-core EPYC, shared),
    4096x4096 at 4 bits, 11 clip ratios: 1.17 s before (70 ns a weight), see docs/scale.md.
    """
    w = np.asarray(w, np.float32)
    n, k = w.shape
    g = n_groups(k, group_size)
    grid = (clip,) if clip is not None else (grid if search else (1.0,))
    imp = None
    if importance is not None:
        imp = pad_to_groups(np.asarray(importance, np.float32)[None], group_size)[0]  # (G, g)
        imp = np.maximum(imp, imp.mean() * 1e-3 + 1e-12)
        # padding columns hold zeros, which every candidate reproduces exactly: no mask needed
    nb = -(-group_size * bits // 8)
    data = np.empty((n, g, nb), np.uint8)
    scales = np.empty((n, g), np.float16)
    zeros = None if symmetric else np.empty((n, g), np.uint8)
    for r0 in range(0, n, rows_per_chunk):
        wg = pad_to_groups(w[r0:r0 + rows_per_chunk], group_size)
        r1 = r0 + len(wg)
        codes = np.empty(wg.shape, np.uint8)
        s, z = find_params(wg, bits, symmetric, imp, grid, codes_out=codes)
        data[r0:r1] = pack_codes(codes, bits)
        scales[r0:r1] = s
        if zeros is not None:
            zeros[r0:r1] = z
    out = {"data": data, "scales": scales}
    if zeros is not None:
        out["zeros"] = pack_codes(zeros, bits)
    return out
