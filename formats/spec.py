"""The llmpack file format, version 2 — the one spec the writer and the reader share.

Layout (all integers little-endian)::

    0   8 bytes  magic  b"LLMPACK\\0"
    8   u32      format version (FORMAT_VERSION)
    12  u32      flags (0; reserved)
    16  u64      header offset  (byte offset of the JSON header)
    24  u64      header length  (bytes)
    32  u32      CRC32 of the header bytes (version >= 2; zero in version 1)
    36  28 bytes zero padding
    64  tensor data, every part starting at a multiple of ALIGN (64) bytes
    ..  UTF-8 JSON header; the file ends exactly where the header ends

The header sits at the end so a converter can stream tensors to disk one at a time
and only then write the directory (checksums are known once the data is written).

Version 2 adds the header CRC32 at offset 32 (the reader always checks it: the header is small,
and without it a bit flip in the JSON can rename a tensor or change a number and still load)
and requires the flags and the padding to be zero. A version-1 file (no header CRC) still
reads. Whatever the version, the header must pass one schema (formats/schema.py) before any
backend sees it. The writer writes the prefix last, after the header is on disk and synced:
until then the file starts with 64 zero bytes and is no llmpack file under any name.

Header JSON (keys)::

    format_version  int, equals the binary field
    min_reader      str, the oldest llmpack version that reads this file
    model           canonical model description the runtime executes (see converter.arch)
    config          the source config.json, HF field names kept as-is (provenance / tooling)
    tokenizer       {"kind": "hf_json"|"sentencepiece", "blob": tensor name, "special": {...},
                     "add_bos": bool, "chat_template": str|null}
    generation      defaults from generation_config.json (eos_token_id, temperature, …)
    provenance      {"converter": version, "source": {file: sha256}, "options": {...}}
    quality         list of measured reports (later steps append; may be empty)
    tensors         [{"name", "type", "shape", "group_size"?, "nnz"? (q{b}m types only: kept weights),
                      "parts": {part: [offset, nbytes, crc32]}}]

A tensor is one logical array (`shape`) stored in one or more *parts*. Plain types have a
single part "data". Quantized types store a weight W of logical shape (N, K) — a linear
layer (out, in), or an embedding/head (vocab, hidden), i.e. row-wise blocks — group-wise
along K with group size g (a tensor entry's "group_size"; one of GROUP_SIZES)::

    data    uint8  (N, ceil(K/g), g*bits/8)    codes, one little-endian bit stream per group,
                                               low bits first
    scales  f16    (N, ceil(K/g))
    zeros   uint8  (N, ceil(ceil(K/g)*bits/8)) zero points, packed the same way (optional;
                                               without it the zero point is 2**(bits-1):
                                               symmetric)
    W[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g]

K is padded with code == zero (i.e. value 0) up to a whole number of groups. Every tensor
records its own type and group size, so one file mixes precisions freely.

Storage-type table (bits/weight = codes + f16 scale + packed zero point, at g = 32)::

    type  packing                                          = MatMulNBits?   bits/weight
                                                                            sym    asym
    q8    1 code per byte                                  yes (8-bit)      8.50   8.75
    q4    2 codes per byte, low nibble first               yes (4-bit)      4.50   4.625
    q3    8 codes per 3 bytes: a 24-bit little-endian      no               3.50   3.594
          word, code i at bits 3i..3i+2 (dense)
    q2    4 codes per byte, low bits first                 yes (2-bit)      2.50   2.5625

q8/q4/q2 are byte-for-byte onnxruntime's MatMulNBits B/scales/zero_points, so a backend maps
them without a copy. q3 has no MatMulNBits kernel: a backend widens it at load to the q4
layout (formats.quant.widen_q3_to_q4: same scales; asymmetric codes and zero points keep their
values, symmetric codes are shifted by +4 so q4's implied zero point 8 applies). That costs
4/3 of the code bytes, in private memory instead of the mapped file: at g = 32 asymmetric,
4.625 bits/weight of RAM for a 3.59 bits/weight file. The numpy backend dequantizes every
type directly (quant.dequantize); the embedding gathers and dequantizes only the rows it
needs (Pack.array(name, rows=ids)), like onnxruntime's GatherBlockQuantized.

Sparse quantized types (formats/sparse.py packs and expands them): the same codes, scales and
zero points as q{b}, but pruned weights (value exactly 0, i.e. code == zero point) are not
stored. Both come in every code width b = 8/4/3/2; K is padded to whole groups as above::

    q{b}s24  2:4 — of every 4 consecutive weights along K (a "quad"), 2 are kept
      data    uint8 (N, G, g*b/16)   the kept codes in K order, packed per group like q{b}'s data
      index   uint8 (N, G, g/8)      per quad the two kept positions p0 < p1 in 0..3, 2 bits each,
                                     in K order (p0 then p1), packed 4 per byte low bits first
      scales, zeros                  as q{b}
    q{b}m    unstructured — a bitmask of kept weights plus the kept codes; the tensor entry
             carries "nnz" (the number of kept weights) so every part's size follows from the header
      mask    uint8 (N, G, g/8)      bit j (low first) of byte i of a row: column 8i+j is kept
      offsets <u4   (N+1,)           kept weights in the rows before row r (offsets[N] = nnz);
                                     rows are addressable without reading the whole mask
      data    uint8 (ceil(nnz*b/8),) the kept codes, row by row in K order, as one little-endian
                                     bit stream (b = 3: 8 codes per 3 bytes, as q3)
      scales, zeros                  as q{b}

A quad with fewer than 2 nonzero weights keeps zero-valued positions to make 2 (padding quads
keep positions 0 and 1, code == zero point). The reader checks at expansion that p0 < p1 and
that the mask's popcounts match the offsets (FormatError otherwise). Bits/weight at g = 32
(spec.bits_per_weight; q{b}m at 50 % kept, offsets ~0.04 at K = 896 not counted)::

    type     sym     asym        type    sym     asym
    q8s24    5.50    5.75        q8m     5.50    5.75
    q4s24    3.50    3.625       q4m     3.50    3.625
    q3s24    3.00    3.094       q3m     3.00    3.094
    q2s24    2.50    2.5625      q2m     2.50    2.5625

so 50 % sparsity + q4 costs what dense q3 does (3.5 / 3.59). No kernel runs them sparse:
backends expand them at load to q{b} (Pack.array dequantizes; the onnxruntime backend builds
the MatMulNBits layout, formats.sparse.expand), costing the dense q{b} bytes in private memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAGIC = b"LLMPACK\x00"
FORMAT_VERSION = 2
PREFIX_SIZE = 64
HEADER_CRC_OFFSET = 32  # u32 CRC32 of the header bytes (format version >= 2)
ALIGN = 64
MAX_HEADER_BYTES = 64 << 20  # a header is metadata; anything larger is corruption
# Which llmpack release first reads each format version (for "file too new" messages).
READER_FOR_VERSION = {1: "0.1", 2: "0.2"}
MAX_DIMS = 8  # a tensor shape has at most this many dimensions (numpy's own limit is 64)
MAX_DIM = 1 << 40  # no dimension larger than this (every byte must lie in the file anyway)


@dataclass(frozen=True)
class StorageType:
    """One row of the storage-type table: how a logical tensor becomes bytes."""

    name: str
    bits: int  # bits per element of the logical tensor (codes only for quantized types)
    numpy: str | None  # numpy dtype of the single "data" part for plain types
    quantized: bool = False
    sparse: str | None = None  # None (dense), "2:4" (q{b}s24) or "mask" (q{b}m): see the docstring

    @property
    def dense(self) -> str:
        """The dense type with the same codes (q4s24 -> q4); the type itself when dense."""
        return f"q{self.bits}" if self.sparse else self.name


STORAGE_TYPES: dict[str, StorageType] = {
    t.name: t
    for t in [
        StorageType("f32", 32, "<f4"),
        StorageType("f16", 16, "<f2"),
        StorageType("bf16", 16, "<u2"),  # raw bfloat16 bits; the reader widens to f32
        StorageType("i32", 32, "<i4"),
        StorageType("u8", 8, "u1"),  # opaque bytes (tokenizer files)
        StorageType("q8", 8, None, quantized=True),
        StorageType("q4", 4, None, quantized=True),
        StorageType("q3", 3, None, quantized=True),  # dense 3-bit stream; widened to q4 to run
        StorageType("q2", 2, None, quantized=True),
    ]
    + [StorageType(f"q{b}s24", b, None, quantized=True, sparse="2:4") for b in (8, 4, 3, 2)]
    + [StorageType(f"q{b}m", b, None, quantized=True, sparse="mask") for b in (8, 4, 3, 2)]
}
SPARSE_PATTERNS = ("2:4", "mask")

GROUP_SIZES = (16, 32, 64, 128, 256)


def n_groups(k: int, group_size: int) -> int:
    return math.ceil(k / group_size)


def sparse_type(bits: int, pattern: str | None) -> str:
    """Storage type name for `bits`-bit codes under a sparsity pattern (None, "2:4", "mask")."""
    return {None: f"q{bits}", "2:4": f"q{bits}s24", "mask": f"q{bits}m"}[pattern]


def quantized_nbytes(type_name: str, shape: tuple[int, int], group_size: int, has_zeros: bool,
                     nnz: int | None = None) -> int:
    """Bytes a quantized tensor occupies (all parts, without alignment padding); `nnz` (kept
    weights) is needed for the mask types."""
    return sum(math.prod(pshape) * (2 if dtype == "<f2" else 4 if dtype == "<u4" else 1)
               for dtype, pshape in part_layout(type_name, shape, group_size, has_zeros, nnz).values())


def bits_per_weight(type_name: str, group_size: int, has_zeros: bool, density: float = 1.0) -> float:
    """Storage bits per weight of a quantized type for a long row (K a multiple of the group;
    the mask types' per-row offsets left out), `density` the kept fraction for the mask types."""
    st = STORAGE_TYPES[type_name]
    b = st.bits
    side = 16 / group_size + (b / group_size if has_zeros else 0)  # f16 scale + packed zero point
    if st.sparse == "2:4":
        return b / 2 + 1 + side
    if st.sparse == "mask":
        return b * density + 1 + side
    return b + side


def part_layout(type_name: str, shape: tuple[int, ...], group_size: int | None, has_zeros: bool,
                nnz: int | None = None) -> dict:
    """Map part name -> (numpy dtype string, shape) for a tensor of this storage type (`nnz`,
    the kept weights, for the mask types)."""
    st = STORAGE_TYPES[type_name]
    if not st.quantized:
        return {"data": (st.numpy, tuple(shape))}
    n, k = shape
    g = n_groups(k, group_size)
    if st.sparse == "2:4":
        parts = {"data": ("u1", (n, g, group_size * st.bits // 16)), "index": ("u1", (n, g, group_size // 8))}
    elif st.sparse == "mask":
        if nnz is None:
            raise ValueError(f"type {type_name} needs nnz (the number of kept weights)")
        parts = {"mask": ("u1", (n, g, group_size // 8)), "offsets": ("<u4", (n + 1,)),
                 "data": ("u1", (math.ceil(nnz * st.bits / 8),))}
    else:
        parts = {"data": ("u1", (n, g, group_size * st.bits // 8))}
    parts["scales"] = ("<f2", (n, g))
    if has_zeros:
        parts["zeros"] = ("u1", (n, math.ceil(g * st.bits / 8)))
    return parts


def align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN
