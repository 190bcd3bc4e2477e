"""tools/synth_checkpoint.py writes folders that transformers itself loads, for every family
llmpack supports, with every weight present (none left to random init) and the shapes the
config implies; a sharded variant round-trips through its index; llmpack converts one."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from synth_checkpoint import FAMILIES, main, synthesize  # noqa: E402


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_loads_every_family(tmp_path, family):
    import torch
    import transformers

    main(["--family", family, "--tiny", "--out", str(tmp_path / family), "--quiet"])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / family), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = json.loads((tmp_path / family / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["dtype"] == "bfloat16"
    assert cfg["architectures"] == [type(model).__name__]  # what llama.cpp's convert_hf_to_gguf.py dispatches on
    # Realistic scales: matrices std ~0.02, norm weights ~1 (Gemma stores them as an offset from 1).
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert 0.015 < p.std().item() < 0.025, name
        elif name.endswith("weight"):  # 1-D weights are the norms'
            mean = p.mean().item()
            assert abs(mean - (0.0 if family == "gemma3_text" else 1.0)) < 0.02, (name, mean)
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_sharded_index_and_overrides(tmp_path):
    from safetensors import safe_open

    out = synthesize(tmp_path / "s", "llama", dict(FAMILIES["llama"][1], num_hidden_layers=5, vocab_size=300,
                                                   hidden_size=96, intermediate_size=160),
                     shard_gb=0.0002, quiet=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    total = 0
    for f in files:
        with safe_open(str(out / f), framework="np") as h:
            for name in h.keys():
                assert index["weight_map"][name] == f
                total += int(np.prod(h.get_slice(name).get_shape()))
    assert index["metadata"]["total_size"] == total * 2
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (5, 96, 160)


def test_cli_layers_override_and_llmpack_converts_it(tmp_path):
    from llmpack.converter.convert import convert

    main(["--family", "qwen2", "--tiny", "--layers", "2", "--hidden", "96", "--intermediate", "40",
          "--out", str(tmp_path / "q"), "--quiet"])
    header = convert(tmp_path / "q", tmp_path / "q.llmpack", bits=4, quiet=True)
    shapes = {t["name"]: t["shape"] for t in header["tensors"]}
    assert header["model"]["n_layers"] == 2
    assert shapes["embed.weight"] == [300, 96] and shapes["layers.1.mlp.down.weight"] == [96, 40]
