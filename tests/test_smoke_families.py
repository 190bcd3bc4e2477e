"""f32 pack of every family's tiny model reproduces transformers' logits (full sequence and KV cache)."""
import numpy as np
import pytest

from tiny_models import FAMILIES, hf_logits, make_tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_match_transformers(family, tmp_path):
    from llmpack.converter import convert
    from llmpack.runtime import load

    model = make_tiny(family, tmp_path / "ckpt")
    convert(tmp_path / "ckpt", tmp_path / "m.llmpack", dtype="f32", quiet=True)
    rt = load(tmp_path / "m.llmpack")
    ids = np.random.default_rng(1).integers(0, 290, 40)
    ref = hf_logits(model, ids)
    scale = np.abs(ref).max()
    assert np.abs(rt.logits(ids) - ref).max() <= 1e-4 * scale
    cache = rt.backend.new_cache()
    steps = [rt.backend.forward(ids[:20], cache)] + [rt.backend.forward([t], cache) for t in ids[20:]]
    assert np.abs(np.concatenate(steps) - ref).max() <= 1e-4 * scale
