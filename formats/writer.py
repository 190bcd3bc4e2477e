"""Streaming, atomic writer: tensors go to disk as they are produced; the header comes last.

The file is written under a temporary name `.OUT.tmp-PID.XXXXXXXX` next to OUT and renamed into
place at the end. Its 64-byte prefix (magic, version, header offset/length/CRC) stays zero until
the header is on disk and synced, so a writer killed before that leaves a file that is no
llmpack file. (One exception: `finish(amend=...)` measures the complete temporary file, e.g.
`convert --eval`; a kill during that leaves a valid pack under the temporary name.) Every new
writer of OUT removes the temporaries of OUT whose writing process is gone.
"""
from __future__ import annotations

import errno
import json
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .errors import LlmpackError
from .spec import (FORMAT_VERSION, HEADER_CRC_OFFSET, MAGIC, PREFIX_SIZE, READER_FOR_VERSION, STORAGE_TYPES,
                   align, part_layout)


class PackWriter:
    """Use as a context manager; on any exception the temporary file is removed and OUT is untouched."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: list[dict] = []
        self._names: set[str] = set()
        self._fh = None
        self._tmp = None

    def __enter__(self):
        if self.path.exists() and self.path.is_dir():
            raise LlmpackError(f"output {self.path} is a directory; give a file name such as model.llmpack")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise LlmpackError(f"output folder {parent} does not exist; create it first")
        remove_stale_temporaries(self.path)
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=f"{temporary_prefix(self.path)}{os.getpid()}.", dir=parent)
        except OSError as e:
            raise LlmpackError(f"cannot write in {parent} ({e.strerror}); choose another output folder") from None
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(b"\0" * PREFIX_SIZE)  # written last, in finish(): until then this is no llmpack file
        return self

    def __exit__(self, exc_type, exc, tb):
        # Not finished (an exception, or finish() never called): no header, so no file either.
        # Once finish() has moved the file into place there is no temporary left to remove.
        if self._tmp is not None:
            if not self._fh.closed:
                self._fh.close()
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LlmpackError(f"the disk holding {self.path.parent.resolve()} is full ({exc.strerror}); "
                               f"free some space or choose another output folder; nothing was written") from exc
        return False

    def add(self, name: str, type_name: str, shape, parts: dict[str, np.ndarray], group_size: int | None = None,
            nnz: int | None = None):
        """Append one tensor given its parts (already in storage form, see spec.part_layout);
        `nnz` (kept weights) for the sparse mask types."""
        if name in self._names:
            raise ValueError(f"duplicate tensor {name}")
        shape = tuple(int(s) for s in shape)
        layout = part_layout(type_name, shape, group_size, "zeros" in parts, nnz)
        if set(layout) != set(parts):
            raise ValueError(f"{name}: parts {sorted(parts)} != {sorted(layout)} for type {type_name}")
        entry = {"name": name, "type": type_name, "shape": list(shape), "parts": {}}
        if group_size is not None:
            entry["group_size"] = group_size
        if nnz is not None:
            entry["nnz"] = int(nnz)
        for pname, (dtype, pshape) in layout.items():
            arr = np.asarray(parts[pname], order="C")  # (ascontiguousarray would make a scalar 1-D)
            if arr.dtype != np.dtype(dtype) or arr.shape != pshape:
                raise ValueError(f"{name}.{pname}: got {arr.dtype}{arr.shape}, spec says {dtype}{pshape}")
            pos = self._fh.tell()
            self._fh.write(b"\0" * (align(pos) - pos))
            offset = self._fh.tell()
            buf = memoryview(arr).cast("B")
            self._fh.write(buf)
            entry["parts"][pname] = [offset, buf.nbytes, zlib.crc32(buf)]
        self.tensors.append(entry)
        self._names.add(name)

    def add_array(self, name: str, arr: np.ndarray, type_name: str):
        """Plain (non-quantized) tensor from a float/int array, converted to `type_name`."""
        st = STORAGE_TYPES[type_name]
        if type_name == "bf16":
            data = _to_bf16_bits(np.asarray(arr, np.float32))
        else:
            data = np.asarray(arr).astype(st.numpy)
        self.add(name, type_name, data.shape, {"data": data})

    def add_blob(self, name: str, blob: bytes):
        self.add(name, "u8", (len(blob),), {"data": np.frombuffer(blob, np.uint8)})

    def _write_header(self, header: dict, hoff: int):
        """Header first, synced, then the prefix that makes the file a pack (zeroed meanwhile)."""
        blob = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        self._fh.seek(0)
        self._fh.write(b"\0" * PREFIX_SIZE)
        self._fh.seek(hoff)
        self._fh.truncate()
        self._fh.write(blob)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.seek(0)
        self._fh.write(MAGIC + struct.pack("<IIQQ", FORMAT_VERSION, 0, hoff, len(blob)))
        self._fh.seek(HEADER_CRC_OFFSET)
        self._fh.write(struct.pack("<I", zlib.crc32(blob)))
        self._fh.flush()

    def finish(self, header: dict, amend=None):
        """Write header and prefix, fsync, and atomically move the file into place.

        `amend(tmp_path) -> dict`, if given, runs on the complete (still temporary) file, e.g. to
        measure it; the header is then rewritten with its returned fields before the move.
        """
        header = dict(header, format_version=FORMAT_VERSION, min_reader=READER_FOR_VERSION[FORMAT_VERSION],
                      tensors=self.tensors)
        pos = self._fh.tell()
        self._fh.write(b"\0" * (align(pos) - pos))
        hoff = self._fh.tell()
        self._write_header(header, hoff)
        if amend is not None:
            self._write_header(dict(header, **amend(Path(self._tmp))), hoff)
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)
        self._tmp = None


def temporary_prefix(out: Path) -> str:
    """Temporaries of OUT are named `.OUT.tmp-PID.XXXXXXXX` in OUT's folder."""
    return f".{Path(out).name}.tmp-"


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries of OUT left by writers that were killed (their process is gone);
    returns what was removed. A temporary of a live process (a conversion running now) stays."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    pattern = re.compile(re.escape(temporary_prefix(out)) + r"(\d+)\.[A-Za-z0-9_]+$")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and not _process_alive(int(m.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or a number we cannot ask about): leave it
    return True


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (as torch does)."""
    u = x.view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    # NaN must stay NaN: rounding a large payload would carry into the sign/exponent (-> -0.0).
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(x), quiet_nan, rounded >> np.uint32(16)).astype(np.uint16)

