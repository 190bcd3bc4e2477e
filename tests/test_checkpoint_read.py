"""Checkpoint.get (plain reads, chunked bf16 widening) returns exactly what safetensors' own
reader gives, for every stored dtype, across chunk boundaries and shards."""
from __future__ import annotations

import numpy as np
import pytest
from tiny_models import make_tiny

from llmpack.converter import checkpoint as ckpt_mod
from llmpack.converter.checkpoint import Checkpoint


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_get_matches_safetensors(tmp_path, dtype, monkeypatch):
    import torch
    from safetensors import safe_open

    make_tiny("llama", tmp_path, dtype=dtype, max_shard_size="40KB")
    monkeypatch.setattr(ckpt_mod, "READ_CHUNK", 1000)  # many chunks per tensor, odd boundaries
    ck = Checkpoint(tmp_path)
    names = ck.tensor_names()
    assert len(set(names.values())) > 1  # sharded
    for name, f in names.items():
        with safe_open(str(f), framework="pt") as h:
            ref = h.get_tensor(name).to(torch.float32).numpy()
        got = ck.get(name)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), name
        assert ck.shape(name) == ref.shape
    assert ck.dtypes() == {"F32": {"F32"}, "F16": {"F16"}, "BF16": {"BF16"}}[
        {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]]


def test_truncated_shard_is_one_line_error(tmp_path):
    from llmpack.formats.errors import LlmpackError

    make_tiny("llama", tmp_path, dtype="bfloat16")
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(LlmpackError, match="not a readable safetensors file"):
        Checkpoint(tmp_path).tensor_names()
