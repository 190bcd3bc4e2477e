"""Reading a transformers checkpoint folder: config, weight files, tokenizer files — lazily."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmpack.formats.errors import LlmpackError

from .checks import check_finite


class Checkpoint:
    """A validated checkpoint folder. Tensors are read one at a time (safetensors' lazy reader)."""

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
        self._handles = {}
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
            from safetensors import safe_open

            self._index = {}
            for f in self.weight_files:
                try:
                    h = safe_open(str(f), framework="pt")
                except Exception as e:  # safetensors raises its own error types for corrupt headers
                    raise LlmpackError(f"{f}: not a readable safetensors file ({e})")
                self._handles[f] = h
                for name in h.keys():
                    self._index[name] = f
        return self._index

    def get(self, name: str):
        """One tensor as a float32 numpy array (bf16/fp16 widened)."""
        import torch

        t = self._handles[self.tensor_names()[name]].get_tensor(name)
        if t.dtype in (torch.float16, torch.bfloat16, torch.float64):
            t = t.float()
        arr = t.numpy()
        check_finite(name, arr)  # NaN/Inf weights: refused while streaming, naming the tensor
        return arr

    def dtypes(self) -> set[str]:
        out = set()
        for f in self.weight_files:
            header_len = int.from_bytes(f.open("rb").read(8), "little")
            with f.open("rb") as fh:
                fh.seek(8)
                hdr = json.loads(fh.read(header_len))
            out |= {v["dtype"] for k, v in hdr.items() if k != "__metadata__"}
        return out

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
