"""End-to-end parity: every family's tiny checkpoint -> .llmpack -> numpy runtime == transformers.

Each tiny model is built once per module and each pack converted once (see `Zoo`), so the
whole file stays fast. Tolerances are relative to the largest reference logit.
"""
import json

import numpy as np
import pytest

from tiny_models import FAMILIES, hf_logits, load_hf, make_tiny

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

SEQ_LEN = 40
N_SEQS = 10  # quantized agreement is measured over N_SEQS * SEQ_LEN positions
GEN_PROMPT = 8
GEN_TOKENS = 32

F32_TOL = 1e-4
F16_TOL, F16_AGREE = 5e-3, 0.99
Q8_TOL, Q8_AGREE = 6e-2, 0.95

# (family, dtype saved by transformers, max_shard_size): bf16 checkpoints and sharded ones
# (>= 3 shards plus model.safetensors.index.json), each for at least two families.
SOURCE_VARIANTS = [
    ("llama", "bfloat16", None),
    ("gemma3_text", "bfloat16", None),
    ("qwen2", "float32", "100KB"),
    ("gpt2", "float32", "100KB"),
    ("phi", "bfloat16", "100KB"),
]


def _seqs():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 290, SEQ_LEN) for _ in range(N_SEQS)]


class Zoo:
    """Lazily builds (once) tiny checkpoints, their reference logits and converted packs."""

    def __init__(self, root):
        self.root = root
        self._models, self._refs, self._packs = {}, {}, {}

    def checkpoint(self, family, src_dtype="float32", shard=None):
        key = (family, src_dtype, shard)
        if key not in self._models:
            folder = self.root / f"{family}-{src_dtype}-{shard or 'single'}"
            model = make_tiny(family, folder, dtype=src_dtype, max_shard_size=shard)
            if src_dtype != "float32":
                model = load_hf(folder)  # what transformers itself runs from that folder
            self._models[key] = (model, folder)
        return self._models[key]

    def reference(self, family, src_dtype="float32", shard=None):
        """Reference logits (N_SEQS*SEQ_LEN, V) of the transformers model, concatenated."""
        key = (family, src_dtype, shard)
        if key not in self._refs:
            model, _ = self.checkpoint(*key)
            self._refs[key] = np.concatenate([hf_logits(model, s) for s in _seqs()])
        return self._refs[key]

    def pack(self, family, dtype, src_dtype="float32", shard=None):
        key = (family, dtype, src_dtype, shard)
        if key not in self._packs:
            from llmpack.converter import convert
            from llmpack.runtime import load

            _, folder = self.checkpoint(family, src_dtype, shard)
            out = self.root / f"{family}-{src_dtype}-{shard or 'single'}.{dtype}.llmpack"
            convert(folder, out, dtype=dtype, quiet=True)
            self._packs[key] = load(out, backend="numpy")
        return self._packs[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    import transformers

    verbosity = transformers.logging.get_verbosity()
    threads = torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matrices: threads only contend (generate is ~6x faster on 2 cores)
    try:
        yield Zoo(tmp_path_factory.mktemp("parity"))
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


def _runtime_logits(rt):
    return np.concatenate([rt.logits(s) for s in _seqs()])


def _cached_logits(rt, ids, prefill=20):
    cache = rt.backend.new_cache()
    steps = [rt.backend.forward(ids[:prefill], cache)]
    steps += [rt.backend.forward([t], cache) for t in ids[prefill:]]
    assert cache.length == len(ids)
    return np.concatenate(steps)


def _assert_close(got, ref, tol):
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max()
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol} x max|logit| {scale:.3g}"


# -- f32: exact parity ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_match_transformers(zoo, family):
    rt = zoo.pack(family, "f32")
    ref = zoo.reference(family)
    ids = _seqs()[0]
    ref0 = ref[:SEQ_LEN]
    got = rt.logits(ids)
    assert got.shape == ref0.shape and got.dtype == np.float32
    _assert_close(got, ref0, F32_TOL)
    _assert_close(_cached_logits(rt, ids), ref0, F32_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(zoo, family):
    model, _ = zoo.checkpoint(family)
    rt = zoo.pack(family, "f32")
    prompt = _seqs()[1][:GEN_PROMPT]
    with torch.no_grad():
        # eos_token_id=None: neither side may stop early, so 32 tokens are compared one by one.
        out = model.generate(torch.tensor([list(prompt)]), attention_mask=torch.ones(1, GEN_PROMPT, dtype=torch.long),
                             do_sample=False, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                             eos_token_id=None, pad_token_id=0)
    expected = out[0, GEN_PROMPT:].tolist()
    assert len(expected) == GEN_TOKENS
    got = list(rt.generate_ids(prompt, GEN_TOKENS, temperature=0.0, stop=False))
    assert got == expected


# -- source variants: bf16-saved and sharded checkpoints ----------------------------------------
@pytest.mark.parametrize("family,src_dtype,shard", SOURCE_VARIANTS,
                         ids=[f"{f}-{d}-{s or 'single'}" for f, d, s in SOURCE_VARIANTS])
def test_source_variants(zoo, family, src_dtype, shard):
    _, folder = zoo.checkpoint(family, src_dtype, shard)
    shards = sorted(folder.glob("*.safetensors"))
    if shard:
        assert len(shards) >= 3, shards
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert {p.name for p in shards} == set(index["weight_map"].values())
    else:
        assert [p.name for p in shards] == ["model.safetensors"]
    ref = zoo.reference(family, src_dtype, shard)[:SEQ_LEN]
    ids = _seqs()[0]
    dtypes = ["f32", "bf16"] if src_dtype == "bfloat16" else ["f32"]
    for dtype in dtypes:  # a bf16 checkpoint stored as bf16 loses nothing either
        rt = zoo.pack(family, dtype, src_dtype, shard)
        prov = rt.header["provenance"]
        assert prov["source_dtypes"] == (["BF16"] if src_dtype == "bfloat16" else ["F32"])
        assert set(prov["source"]) >= {p.name for p in shards}
        _assert_close(rt.logits(ids), ref, F32_TOL)
        _assert_close(_cached_logits(rt, ids), ref, F32_TOL)


# -- lossy packs: top-1 agreement and bounded error -------------------------------------------
def _agreement(got, ref):
    return float((got.argmax(-1) == ref.argmax(-1)).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_pack(zoo, family):
    rt = zoo.pack(family, "f16")
    assert {t["type"] for t in rt.header["tensors"] if len(t["shape"]) == 2} == {"f16"}
    ref = zoo.reference(family)
    got = _runtime_logits(rt)
    assert _agreement(got, ref) >= F16_AGREE
    _assert_close(got, ref, F16_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_pack(zoo, family):
    rt = zoo.pack(family, "q8")
    types = {t["name"]: t["type"] for t in rt.header["tensors"]}
    assert all(types[n] == "q8" for n in types if n.endswith(".weight") and n.startswith("layers.")
               and "norm" not in n), types
    ref = zoo.reference(family)
    got = _runtime_logits(rt)
    assert _agreement(got, ref) >= Q8_AGREE
    _assert_close(got, ref, Q8_TOL)
    # The quantized path itself is exact: it equals the same pack with every tensor dequantized.
    ids = _seqs()[0]
    twin = _dequantized_twin(rt, zoo.root / f"{family}.q8-twin.llmpack")
    _assert_close(rt.logits(ids), twin.logits(ids), 1e-5)
    _assert_close(_cached_logits(rt, ids), twin.logits(ids), 1e-5)


def _dequantized_twin(rt, out):
    """Write `rt`'s pack again with every numeric tensor widened to f32 via Pack.array."""
    from llmpack.formats.writer import PackWriter
    from llmpack.runtime import load

    pack = rt.pack
    header = {k: v for k, v in pack.header.items() if k not in ("tensors", "format_version", "min_reader")}
    with PackWriter(out) as w:
        for t in pack.header["tensors"]:
            if t["type"] == "u8":
                w.add_blob(t["name"], pack.blob(t["name"]))
            else:
                w.add_array(t["name"], pack.array(t["name"]), "f32")
        w.finish(header)
    twin = load(out, backend="numpy")
    assert {t["type"] for t in twin.header["tensors"]} <= {"f32", "u8"}
    return twin


def test_numpy_backend_widens_at_each_use_beyond_its_memory_budget(tmp_path, monkeypatch):
    """A budget of 0 keeps no widened copy (the 7B-on-a-laptop case): the same logits, every
    quantized matrix dequantized at each use."""
    from llmpack.converter import convert
    from llmpack.runtime import load

    make_tiny("qwen2", tmp_path / "ckpt")
    convert(tmp_path / "ckpt", tmp_path / "q4.llmpack", bits=4, quiet=True)
    ids = list(range(3, 40))
    eager = load(tmp_path / "q4.llmpack", backend="numpy")
    monkeypatch.setenv("LLMPACK_NUMPY_BUDGET_GB", "0")
    lazy = load(tmp_path / "q4.llmpack", backend="numpy")
    assert lazy.backend.w.lazy and not eager.backend.w.lazy
    assert np.array_equal(lazy.logits(ids), eager.logits(ids))
