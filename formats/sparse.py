"""Sparse quantized storage (q{b}s24: 2:4, q{b}m: bitmask; byte layouts in spec.py): packing a
pruned, quantized matrix so that the pruned weights take no code bytes, and expanding it back
to the dense q{b} parts every kernel understands.

A sparse tensor is always made from dense q{b} parts (formats.quant) plus a mask of kept
weights; the pruned weights must already hold their group's zero point (value exactly 0), so
`expand(sparsify(parts, mask)) == parts` byte for byte and what is stored is what runs.

Expansion costs the dense q{b} bytes in private memory (plus a transient one-byte-per-weight
code array while a tensor expands); the stored file stays small.
"""
from __future__ import annotations

import numpy as np

from . import quant
from .errors import FormatError
from .spec import STORAGE_TYPES, align, sparse_type

# popcount of every byte value, for the mask's per-row counts
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint32)


def _zero_points(parts: dict, n: int, g: int, bits: int) -> np.ndarray:
    """(n, G) uint8 zero point codes (the implied 2**(bits-1) without a zeros part)."""
    if "zeros" in parts:
        return quant.unpack_codes(parts["zeros"], bits, g)
    return np.full((n, g), 1 << (bits - 1), np.uint8)


def _fill_quads(keep: np.ndarray) -> np.ndarray:
    """keep (n, Q, 4) with at most 2 per quad -> exactly 2 per quad, adding not-kept positions
    (lowest first; they hold the zero point, so their stored value is 0). Raises ValueError if a
    quad keeps more than 2."""
    cnt = keep.sum(-1)
    if (cnt > 2).any():
        raise ValueError("2:4 storage: a quad of 4 weights keeps more than 2")
    keep = keep.copy()
    for _ in range(2):
        short = keep.sum(-1) < 2
        if not short.any():
            break
        first_free = np.argmin(keep, axis=-1)  # lowest position not yet kept
        add = np.zeros_like(keep)
        np.put_along_axis(add, first_free[..., None], True, axis=-1)
        keep |= add & short[..., None]
    return keep


def sparsify(parts: dict, bits: int, group_size: int, pattern: str, mask: np.ndarray | None = None):
    """Dense q{bits} parts (+ kept mask (N, K) bool) -> (type name, sparse parts, nnz or None).

    pattern "2:4": at most 2 kept per 4 consecutive weights along K; "mask": any mask. Without
    `mask`, the kept weights are those whose code is not the zero point (a weight quantized to
    exactly 0 then costs no code either). Raises ValueError if a pruned weight's code is not its
    group's zero point, or a 2:4 quad keeps more than 2.
    """
    n, G = parts["scales"].shape
    kp = G * group_size
    codes = quant.unpack_codes(parts["data"], bits, group_size).reshape(n, kp)
    zp = _zero_points(parts, n, G, bits)
    zp_full = np.repeat(zp, group_size, axis=1)
    if mask is None:
        keep = codes != zp_full
    else:
        mask = np.asarray(mask, bool)
        keep = np.zeros((n, kp), bool)
        keep[:, :mask.shape[1]] = mask
    if (codes[~keep] != zp_full[~keep]).any():
        raise ValueError("sparse storage: a pruned weight is not quantized to exactly zero (its zero point)")
    out = {"scales": parts["scales"]}
    if "zeros" in parts:
        out["zeros"] = parts["zeros"]
    if pattern == "2:4":
        keep4 = _fill_quads(keep.reshape(n, kp // 4, 4))
        pos = np.nonzero(keep4)[-1].reshape(n, kp // 4, 2).astype(np.uint8)  # ascending per quad
        kept = codes.reshape(n, kp // 4, 4)[keep4].reshape(n, G, group_size // 2)
        out["data"] = quant.pack_codes(kept, bits)
        out["index"] = quant.pack_codes(pos.reshape(n, G, group_size // 2), 2)
        return sparse_type(bits, "2:4"), out, None
    if pattern != "mask":
        raise ValueError(f"unknown sparsity pattern {pattern!r}")
    counts = keep.sum(1)
    offsets = np.zeros(n + 1, np.uint64)
    np.cumsum(counts, out=offsets[1:])
    nnz = int(offsets[-1])
    if nnz >= 1 << 32:
        raise ValueError("mask storage holds at most 2**32 - 1 kept weights per tensor")
    out["mask"] = np.packbits(keep.reshape(n, G, group_size), axis=-1, bitorder="little")
    out["offsets"] = offsets.astype("<u4")
    out["data"] = quant.pack_codes(codes[keep], bits)
    return sparse_type(bits, "mask"), out, nnz


def smallest(parts: dict, bits: int, group_size: int, pattern: str):
    """(type name, parts, nnz or None): the sparse form of dense q{bits} parts if it takes fewer
    bytes, else the dense parts themselves. The index/mask costs 1 bit a weight, so at 2 bits a
    2:4 matrix (1 + 1 bits) or one with half its weights kept is no smaller than dense q2, and
    stays dense (no expansion at load either); the weights are the same either way. (Tiny
    matrices: the offsets' 32 bits a row and each part's 64-byte alignment count too.)"""
    typ, sp, nnz = sparsify(parts, bits, group_size, pattern)
    if sum(align(a.nbytes) for a in sp.values()) < sum(align(a.nbytes) for a in parts.values()):  # as on disk
        return typ, sp, nnz
    return f"q{bits}", parts, None


def _gather_stream(data: np.ndarray, idx: np.ndarray, bits: int) -> np.ndarray:
    """Codes at stream positions idx of a little-endian bit stream (any width up to 8)."""
    buf = np.concatenate([np.asarray(data, np.uint8), np.zeros(1, np.uint8)]).astype(np.uint16)
    bit = idx.astype(np.int64) * bits
    word = buf[bit >> 3] | (buf[(bit >> 3) + 1] << np.uint16(8))
    return ((word >> (bit & 7).astype(np.uint16)) & np.uint16((1 << bits) - 1)).astype(np.uint8)


def expand(parts: dict, type_name: str, shape, group_size: int, nnz: int | None = None, rows=None) -> dict:
    """Sparse parts -> the dense q{b} parts (data, scales, zeros?) of the same tensor; `rows`
    selects rows first (embedding gather). Raises FormatError on inconsistent parts."""
    st = STORAGE_TYPES[type_name]
    bits = st.bits
    scales, zeros = parts["scales"], parts.get("zeros")
    sel = slice(None) if rows is None else np.asarray(rows)
    scales = scales[sel]
    n, G = scales.shape
    out = {"scales": scales}
    if zeros is not None:
        out["zeros"] = zeros[sel]
    zp = _zero_points(out, n, G, bits)
    full = np.repeat(zp, group_size, axis=1)  # (n, Kp): every weight 0 until a kept code lands
    kp = G * group_size
    if st.sparse == "2:4":
        idx = quant.unpack_codes(parts["index"][sel], 2, group_size // 2).reshape(n, kp // 4, 2)
        if (idx[..., 0] >= idx[..., 1]).any():
            raise FormatError(f"a 2:4 tensor's index is not two ascending positions per quad; the file is corrupt")
        kept = quant.unpack_codes(parts["data"][sel], bits, group_size // 2).reshape(n, kp // 4, 2)
        np.put_along_axis(full.reshape(n, kp // 4, 4), idx.astype(np.intp), kept, axis=-1)
    elif st.sparse == "mask":
        offsets = parts["offsets"].astype(np.int64)
        mask = parts["mask"][sel].reshape(n, -1)
        counts = _POPCOUNT[mask].sum(1).astype(np.int64)
        starts, ends = (offsets[:-1], offsets[1:]) if rows is None else (offsets[sel], offsets[sel + 1])
        if offsets[0] != 0 or offsets[-1] != nnz or not np.array_equal(ends - starts, counts):
            raise FormatError("a masked tensor's offsets do not match its mask; the file is corrupt")
        keep = np.unpackbits(mask, axis=-1, count=kp, bitorder="little").astype(bool)
        if rows is None:
            codes = quant.unpack_codes(parts["data"], bits, nnz)
        else:  # stream positions of the selected rows' codes, in row order
            tot = int(counts.sum())
            rep = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            codes = _gather_stream(parts["data"], np.arange(tot) + rep, bits)
        full[keep] = codes
    else:
        raise ValueError(f"{type_name} is not a sparse type")
    out["data"] = quant.pack_codes(full.reshape(n, G, group_size), bits)
    return out


def dequantize(parts: dict, type_name: str, shape, group_size: int, nnz: int | None = None, rows=None):
    """Parts of any quantized type (dense q{b} or sparse) -> float32 (n, K), rows selected first:
    the one dispatch the reader and the converter's healing share."""
    if STORAGE_TYPES[type_name].sparse:
        parts = expand(parts, type_name, shape, group_size, nnz, rows)
        rows = None
    return quant.dequantize(parts, shape, STORAGE_TYPES[type_name].bits, group_size, rows)
