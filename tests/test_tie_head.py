"""--tie-head (converter/steps/tie_head.py): an untied head stored as the embedding times a fitted map.

Trusted result: a checkpoint whose head is planted as exactly E M0 becomes a tied file whose
logits equal transformers' on the numpy backend, onnxruntime and the exported ONNX; the head's
bytes are gone; refusals are one line.
"""
import numpy as np
import pytest

from refusals import assert_convert_refuses
from tiny_models import load_hf, hf_logits, make_tiny

torch = pytest.importorskip("torch")

from llmpack.converter import convert  # noqa: E402
from llmpack.formats import Pack  # noqa: E402
from llmpack.runtime import load  # noqa: E402

IDS = [int(t) for t in np.random.default_rng(5).integers(2, 290, 24)]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny untied llama whose head is E @ M0 (M0 a random well-conditioned D x D map)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("tie") / "ckpt"
    make_tiny("llama", folder, tie_word_embeddings=False)
    sd = load_file(str(folder / "model.safetensors"))
    E = sd["model.embed_tokens.weight"].double()
    M0 = torch.eye(E.shape[1], dtype=torch.float64) + 0.3 * torch.randn(E.shape[1], E.shape[1],
                                                                        generator=torch.Generator().manual_seed(1))
    sd["lm_head.weight"] = (E @ M0).float()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_planted_head_ties_exactly_on_every_executor(planted, tmp_path):
    from test_export_onnx import BareDecoder

    from llmpack.runtime.cmd_export_onnx import export_onnx

    want = hf_logits(load_hf(planted), IDS)
    untied, tied = tmp_path / "untied.llmpack", tmp_path / "tied.llmpack"
    convert(planted, untied, dtype="f32", quiet=True)
    h = convert(planted, tied, dtype="f32", tie_head=True, quiet=True)
    names = {t["name"] for t in h["tensors"]}
    assert "head.weight" not in names and "head_proj.weight" in names and h["model"]["tied_head"]
    assert h["recipe"][-1]["step"] == "tie_head" and h["recipe"][-1]["residual"] < 1e-5
    V, D = Pack(tied).tensors["embed.weight"]["shape"]
    assert untied.stat().st_size - tied.stat().st_size == pytest.approx(4 * (V * D - D * D), rel=0.01)
    got = load(tied, backend="numpy").logits(IDS)
    assert rel(got, want) <= 1e-5
    assert rel(load(tied, backend="onnxruntime", accuracy_level=0).logits(IDS), want) <= 1e-5
    export_onnx(tied, tmp_path / "onnx", accuracy_level=0)
    assert rel(BareDecoder(tmp_path / "onnx")(IDS), want) <= 1e-5


def test_tied_quantized_file_is_smaller_and_close(planted, tmp_path):
    """q4 with the head tied: the head's codes are gone; the logits stay as close to the source as
    the untied q4 file's (the embedding's codes serve the head)."""
    want = hf_logits(load_hf(planted), IDS)
    untied, tied = tmp_path / "u4.llmpack", tmp_path / "t4.llmpack"
    convert(planted, untied, bits=4, quiet=True)
    convert(planted, tied, bits=4, tie_head=True, quiet=True)
    assert tied.stat().st_size < untied.stat().st_size
    err_tied = rel(load(tied, backend="numpy").logits(IDS), want)
    assert err_tied < 2 * rel(load(untied, backend="numpy").logits(IDS), want) + 1e-3
    assert rel(load(tied, backend="onnxruntime", accuracy_level=0).logits(IDS),
               load(tied, backend="numpy").logits(IDS)) <= 1e-4


def test_sliced_head_ties_across_bases(tiny_ckpts, tmp_path):
    """After slicing the head reads the last block's basis; the map carries it to the first's."""
    _, folder = tiny_ckpts("llama")
    out = tmp_path / "s.llmpack"
    convert(folder, out, slice=0.25, tie_head=True, dtype="f32", quiet=True, calib_samples=4, calib_seqlen=32)
    p = Pack(out)
    assert p.tensors["head_proj.weight"]["shape"] == [p.tensors["embed.weight"]["shape"][1], 48]
    a = load(out, backend="numpy").logits(IDS)
    assert rel(load(out, backend="onnxruntime", accuracy_level=0).logits(IDS), a) <= 1e-5


@pytest.mark.parametrize("family, message", [
    ("qwen2", "--tie-head: this checkpoint's head already is its embedding (tied)"),
    ("phi", "--tie-head: the head has a bias"),
])
def test_tie_head_refusals(family, message, tiny_ckpts, tmp_path):
    assert_convert_refuses(tiny_ckpts(family)[1], tmp_path, ["--tie-head"], message)


def test_planner_ties_a_head_that_costs_nothing(planted, tmp_path):
    """The planted head is exactly E M0: tying is measured as free and the planner takes it; the
    file is at or under the target and records the choice."""
    from llmpack.converter.quantize import calib as calib_mod

    calib = tmp_path / "calib.txt"
    calib.write_text(calib_mod.default_text()[:20000])
    kw = dict(calib=calib, calib_samples=4, calib_seqlen=64, sensitivity_file=tmp_path / "s.json", quiet=True)
    frontier = convert(planted, tmp_path / "f.llmpack", plan_only=True, keep_vocab=True, **kw)
    assert any(row["tied"] for row in frontier["frontier"])
    target = (frontier["smallest_bytes"] + frontier["largest_bytes"]) // 2
    out = tmp_path / "t.llmpack"
    h = convert(planted, out, target_size=str(target), keep_vocab=True, **kw)
    plan = h["recipe"][0]
    assert plan["tie_head"] and plan["tie_head"]["damage_nats_per_byte"] < 1e-6
    assert [r["step"] for r in h["recipe"]] == ["plan", "tie_head", "quantize"]
    assert out.stat().st_size <= target and "head.weight" not in Pack(out).tensors
    assert load(out, backend="numpy").logits(IDS).shape == (len(IDS), 300)
