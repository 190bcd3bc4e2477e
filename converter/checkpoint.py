"""Reading a transformers checkpoint folder: config, weight files, tokenizer files — lazily."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from llmpack.formats.errors import LlmpackError

from .checks import check_finite


# safetensors dtype -> how its bytes are read (bf16 as raw uint16 bits, widened to float32 in get()).
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
           "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
READ_CHUNK = 1 << 26  # bytes per read (64 MB)


class Checkpoint:
    """A validated checkpoint folder. Tensors are read one at a time, straight from the safetensors
    files (the header parsed here, the data with plain reads: see get())."""

    def __init__(self, src: str | Path):
        self.dir = Path(src)
        if not self.dir.exists():
            raise LlmpackError(f"{src}: no such folder; pass a transformers checkpoint folder")
        if not self.dir.is_dir():
            raise LlmpackError(f"{src}: is a file; pass the checkpoint folder that holds config.json")
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise LlmpackError(f"{src}: no config.json; is this a transformers checkpoint folder?")
        try:
            self.config_dict = json.loads(cfg.read_text())
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise LlmpackError(f"{cfg}: invalid JSON ({e}); fix or re-download the checkpoint")
        if not isinstance(self.config_dict, dict):
            raise LlmpackError(f"{cfg}: not a JSON object; fix or re-download the checkpoint")
        self.weight_files = self._find_weights()
        self._headers = {}
        self._index = None

    def _find_weights(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:  # bad JSON / UTF-8, no weight_map, not an object
                raise LlmpackError(f"{index}: unreadable shard index ({e.__class__.__name__}: {e}); "
                                   f"re-download the checkpoint")
            if not (isinstance(wmap, dict) and all(isinstance(f, str) for f in wmap.values())):
                raise LlmpackError(f"{index}: weight_map is not an object of tensor name -> file name; "
                                   f"re-download the checkpoint")
            files = sorted(set(wmap.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise LlmpackError(f"{self.dir}: shard {missing[0]} named in the index is missing")
            return [self.dir / f for f in files]
        single = self.dir / "model.safetensors"
        if single.is_file():
            return [single]
        shards = sorted(self.dir.glob("*.safetensors"))
        if shards:
            return shards
        if list(self.dir.glob("pytorch_model*.bin")):
            raise LlmpackError(f"{self.dir}: only pytorch_model.bin (a pickle) found; llmpack reads safetensors "
                               f"only — re-save with `model.save_pretrained(dir, safe_serialization=True)`")
        raise LlmpackError(f"{self.dir}: no *.safetensors weight files found")

    def tensor_names(self) -> dict[str, Path]:
        """HF tensor name -> file holding it."""
        if self._index is None:
            self._index = {}
            for f in self.weight_files:
                for name in self._header(f):
                    self._index[name] = f
        return self._index

    def _header(self, f: Path) -> dict:
        """A shard's tensor entries {name: {dtype, shape, data_offsets}}, with "start" (absolute)."""
        if f not in self._headers:
            try:
                with f.open("rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    size = f.stat().st_size
                    if not 2 <= n <= size - 8:
                        raise ValueError(f"header length {n} does not fit a {size}-byte file")
                    hdr = json.loads(fh.read(n))
                if not isinstance(hdr, dict):
                    raise ValueError("header is not a JSON object")
                hdr.pop("__metadata__", None)
                for name, e in hdr.items():
                    b, end = e["data_offsets"]
                    if e["dtype"] not in _DTYPES:
                        raise ValueError(f"tensor {name}: unsupported dtype {e['dtype']}")
                    if end - b != _DTYPES[e["dtype"]].itemsize * math.prod(e["shape"]) or 8 + n + end > size:
                        raise ValueError(f"tensor {name}: data offsets do not match its shape or the file")
                    e["start"] = 8 + n + b
            except (ValueError, KeyError, TypeError) as e:  # bad JSON / UTF-8, missing fields
                raise LlmpackError(f"{f}: not a readable safetensors file ({e}); re-download the checkpoint")
            self._headers[f] = hdr
        return self._headers[f]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header(self.tensor_names()[name])[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array (bf16/fp16/f64 widened); other dtypes as stored.

        Read with plain file reads in chunks of READ_CHUNK bytes, not through a memory map: a
        mapping's pages stay in the process's resident set after use, so converting a 3.4 GB
        checkpoint held all 3.4 GB on top of the working set (5.65 GB peak for the 1.5B). The
        widened copy is built chunk by chunk, so memory is the float32 tensor plus one chunk;
        the pages just read are dropped from the page cache (the machine's RAM goes to the
        conversion, not to a checkpoint read once).
        """
        f = self.tensor_names()[name]
        e = self._header(f)[name]
        src = _DTYPES[e["dtype"]]
        shape = tuple(e["shape"])
        count = math.prod(shape)
        wide = src in (np.dtype("<u2"), np.dtype("<f2"), np.dtype("<f8"))  # bf16 is read as uint16 bits
        out = np.empty(count, np.float32 if wide else src)
        per = max(1, READ_CHUNK // src.itemsize)
        buf = np.empty(min(per, count), src) if wide else None
        with f.open("rb", buffering=0) as fh:
            fd = fh.fileno()
            for i in range(0, count, per):
                n = min(per, count - i)
                target = buf[:n] if wide else out[i:i + n]
                mv = memoryview(target).cast("B")
                got, off = 0, e["start"] + i * src.itemsize
                while got < mv.nbytes:
                    r = os.preadv(fd, [mv[got:]], off + got)
                    if r <= 0:
                        raise LlmpackError(f"{f}: file ends inside tensor {name}; re-download the checkpoint")
                    got += r
                if wide:
                    if e["dtype"] == "BF16":
                        np.left_shift(target, np.uint32(16), out=out[i:i + n].view(np.uint32))  # one pass
                    else:
                        out[i:i + n] = target
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, e["start"], count * src.itemsize, os.POSIX_FADV_DONTNEED)
        out = out.reshape(shape)
        check_finite(name, out)  # NaN/Inf weights: refused while streaming, naming the tensor
        return out

    def dtypes(self) -> set[str]:
        return {e["dtype"] for f in self.weight_files for e in self._header(f).values()}

    def json_file(self, name: str) -> dict:
        p = self.dir / name
        if not p.is_file():
            return {}
        try:
            data = json.loads(p.read_text())
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise LlmpackError(f"{p}: invalid JSON ({e})")
        if not isinstance(data, dict):
            raise LlmpackError(f"{p}: not a JSON object; fix or re-download the checkpoint")
        return data

    def sha256_files(self) -> dict[str, str]:
        """Hashes of every source file, recorded as provenance (computed once per Checkpoint)."""
        if getattr(self, "_sha256", None) is not None:
            return dict(self._sha256)
        out = {}
        for p in sorted(self.dir.iterdir()):
            if p.is_file():
                h = hashlib.sha256()
                with p.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                out[p.name] = h.hexdigest()
        self._sha256 = out
        return dict(out)
