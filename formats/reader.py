"""Memory-mapping reader. Validates the whole structure before handing out zero-copy views."""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from . import sparse
from .errors import FormatError
from .schema import check_header, is_int
from .spec import (ALIGN, FORMAT_VERSION, HEADER_CRC_OFFSET, MAGIC, MAX_DIM, MAX_DIMS, MAX_HEADER_BYTES,
                   PREFIX_SIZE, READER_FOR_VERSION, STORAGE_TYPES, GROUP_SIZES, part_layout)


class Pack:
    """An opened .llmpack file: `header`, `tensors` (name -> entry), and array access by name."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        if self.path.is_dir():
            raise FormatError(f"{self.path}: is a folder, not an llmpack file; pass the .llmpack file "
                              f"(`llmpack convert FOLDER -o FILE.llmpack` makes one from a checkpoint folder)")
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        if size < PREFIX_SIZE:
            raise FormatError(f"{self.path}: {size} bytes is too short to be an llmpack file (truncated?)")
        try:
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise FormatError(f"{self.path}: cannot map the file ({e})")
        try:
            self.header = _read_header(self._mm, self.path)
            check_header(self.header, self.path)
            _check_directory(self.header, _header_offset(self._mm), self.path)
            _check_model(self.header, {t["name"]: t for t in self.header["tensors"]}, self.path)
        except FormatError:
            self._mm.close()
            raise
        except Exception as e:  # a malformed header must never surface as TypeError/KeyError/...
            self._mm.close()
            raise FormatError(f"{self.path}: malformed header ({e.__class__.__name__}: {e}); "
                              f"the file is corrupt") from e
        self.tensors = {t["name"]: t for t in self.header["tensors"]}
        self._buf = np.frombuffer(self._mm, np.uint8)
        if verify:
            self.verify()

    def verify(self):
        """Check every part's CRC32; raises FormatError naming the first damaged tensor."""
        for t in self.header["tensors"]:
            for pname, (off, n, crc) in t["parts"].items():
                if zlib.crc32(self._buf[off:off + n]) != crc:
                    raise FormatError(f"{self.path}: tensor {t['name']} ({pname}) fails its checksum: "
                                      f"the file is corrupt; convert it again")

    def __contains__(self, name):
        return name in self.tensors

    def parts(self, name: str) -> dict[str, np.ndarray]:
        """Zero-copy views of a tensor's stored parts."""
        t = self.tensors[name]
        layout = part_layout(t["type"], tuple(t["shape"]), t.get("group_size"), "zeros" in t["parts"], t.get("nnz"))
        out = {}
        for pname, (dtype, shape) in layout.items():
            off, n, _ = t["parts"][pname]
            out[pname] = self._buf[off:off + n].view(dtype).reshape(shape)
        return out

    def blob(self, name: str) -> bytes:
        return self.parts(name)["data"].tobytes()

    def array(self, name: str, rows=None) -> np.ndarray:
        """Logical tensor as float32 (zero-copy for f32; widened/dequantized otherwise)."""
        t = self.tensors[name]
        p = self.parts(name)
        kind = t["type"]
        if kind == "f32" or kind == "i32":
            a = p["data"]
            return a if rows is None else a[rows]
        if kind == "f16":
            a = p["data"] if rows is None else p["data"][rows]
            return a.astype(np.float32)
        if kind == "bf16":
            a = p["data"] if rows is None else p["data"][rows]
            return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
        if STORAGE_TYPES[kind].quantized:
            return sparse.dequantize(p, kind, tuple(t["shape"]), t["group_size"], t.get("nnz"), rows)
        raise FormatError(f"tensor {name} of type {kind} is not numeric")

    def close(self):
        """Drop the pack's own references to the mapping. Views handed out by parts()/array()
        keep it alive; it is unmapped when the last of them is gone."""
        self._buf = None
        try:
            self._mm.close()
        except BufferError:  # views still exported: the mmap closes itself once they are freed
            pass


def _header_offset(mm) -> tuple[int, int]:
    return struct.unpack_from("<QQ", mm, 16)


def _read_header(mm, path) -> dict:
    if mm[:8] != MAGIC:
        raise FormatError(f"{path}: not an llmpack file (bad magic); convert the model with `llmpack convert`")
    version, _flags = struct.unpack_from("<II", mm, 8)
    if version > FORMAT_VERSION:
        need = READER_FOR_VERSION.get(version, "a newer release")
        raise FormatError(f"{path}: format version {version} is newer than this llmpack reads "
                          f"({FORMAT_VERSION}); upgrade llmpack ({need} or later)")
    if version < 1:
        raise FormatError(f"{path}: invalid format version {version}")
    if version >= 2 and (_flags or any(mm[HEADER_CRC_OFFSET + 4:PREFIX_SIZE])):
        raise FormatError(f"{path}: reserved prefix bytes are not zero; the file is corrupt")
    hoff, hlen = _header_offset(mm)
    if hlen > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header claims {hlen} bytes (limit {MAX_HEADER_BYTES}); the file is corrupt")
    if hoff < PREFIX_SIZE or hoff + hlen != len(mm):
        raise FormatError(f"{path}: header at {hoff}+{hlen} does not end the {len(mm)}-byte file; "
                          f"the file is truncated or corrupt")
    raw = bytes(mm[hoff:hoff + hlen])
    if version >= 2:  # version 1 had no header checksum
        (crc,) = struct.unpack_from("<I", mm, HEADER_CRC_OFFSET)
        if zlib.crc32(raw) != crc:
            raise FormatError(f"{path}: the header fails its checksum: the file is corrupt; convert it again")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"{path}: header is not valid JSON ({e.__class__.__name__}); the file is corrupt")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is a JSON {type(header).__name__}, not an object; the file is corrupt")
    if not is_int(header.get("format_version")) or header["format_version"] != version:
        raise FormatError(f"{path}: header format_version {header.get('format_version')!r} does not match "
                          f"the file's version field {version}; the file is corrupt")
    return header


def _check_model(header: dict, tensors: dict, path) -> None:
    """The model section is the model description's (formats/blocks.check_pack: every field typed,
    every shape agreeing, every tensor one the description reads). Both backends run it first
    thing at load, before any computation; the reader itself also opens format-level files (tests,
    `inspect` of a damaged file), so it does not require a runnable model here."""
    return None


def _check_directory(header, header_span, path):
    """Every tensor entry well-typed, its parts sized as its shape needs, aligned, inside the data
    region and disjoint; the tokenizer blob names a byte tensor. Raises FormatError otherwise."""
    hoff, _ = header_span
    spans = []
    seen = {}
    for i, t in enumerate(header["tensors"]):
        if not isinstance(t, dict):
            raise FormatError(f"{path}: tensor directory entry {i} is not an object; the file is corrupt")
        name = t.get("name")
        if not isinstance(name, str) or name in seen:
            raise FormatError(f"{path}: tensor directory has a missing or duplicate name {name!r}; "
                              f"the file is corrupt")
        kind = t.get("type")
        if not isinstance(kind, str) or kind not in STORAGE_TYPES:
            raise FormatError(f"{path}: tensor {name} has unknown storage type {kind!r}; "
                              f"upgrade llmpack or convert again")
        seen[name] = kind
        shape = t.get("shape")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(is_int(s) and 0 <= s <= MAX_DIM for s in shape)):
            raise FormatError(f"{path}: tensor {name} has an invalid shape {_short(shape)} (at most {MAX_DIMS} "
                              f"dimensions of at most {MAX_DIM}); the file is corrupt")
        g = t.get("group_size")
        if STORAGE_TYPES[kind].quantized and (len(shape) != 2 or not is_int(g) or g not in GROUP_SIZES):
            raise FormatError(f"{path}: quantized tensor {name} needs a 2-D shape and a group size "
                              f"in {GROUP_SIZES}, got {shape} / {g!r}")
        nnz = t.get("nnz")
        if STORAGE_TYPES[kind].sparse == "mask" and not (
                is_int(nnz) and 0 <= nnz <= shape[0] * math.ceil(shape[1] / g) * g and nnz < 1 << 32):
            raise FormatError(f"{path}: masked tensor {name} needs a count of kept weights 'nnz' between 0 and "
                              f"its padded size, got {nnz!r}; the file is corrupt")
        parts = t.get("parts")
        if not isinstance(parts, dict):
            raise FormatError(f"{path}: tensor {name} has no parts object (got {type(parts).__name__}); "
                              f"the file is corrupt")
        layout = part_layout(kind, tuple(shape), g, "zeros" in parts, nnz)
        if set(parts) != set(layout):
            raise FormatError(f"{path}: tensor {name} has parts {sorted(parts)}, expected {sorted(layout)}")
        for pname, (dtype, pshape) in layout.items():
            entry = parts[pname]
            if not (isinstance(entry, list) and len(entry) == 3 and all(is_int(x) and x >= 0 for x in entry)):
                raise FormatError(f"{path}: tensor {name} ({pname}) has an invalid location {entry!r}; "
                                  f"expected [offset, nbytes, crc32] as integers; the file is corrupt")
            off, n, _crc = entry
            want = math.prod(pshape) * np.dtype(dtype).itemsize
            if n != want:
                raise FormatError(f"{path}: tensor {name} ({pname}) holds {n} bytes but its shape needs {want}")
            if off % ALIGN or off < PREFIX_SIZE or off + n > hoff:
                raise FormatError(f"{path}: tensor {name} ({pname}) at {off}+{n} lies outside the data region "
                                  f"(ends at {hoff}); the file is corrupt")
            spans.append((off, off + n, name))
    spans.sort()
    for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FormatError(f"{path}: tensors {an} and {bn} overlap; the file is corrupt")
    # (An empty tokenizer section is allowed at this level: format-only files in tests have none.)
    tok = header["tokenizer"]
    if "kind" in tok and not isinstance(tok["kind"], str):
        raise FormatError(f"{path}: the tokenizer kind {tok['kind']!r} is not a string; the file is corrupt")
    if "blob" in tok and (not isinstance(tok["blob"], str) or seen.get(tok["blob"]) != "u8"):
        raise FormatError(f"{path}: the tokenizer blob {tok['blob']!r} is not a byte tensor of this file; "
                          f"the file is corrupt")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
