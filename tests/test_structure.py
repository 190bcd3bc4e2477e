"""Structural compression (converter/steps): SliceGPT slicing, head/MLP pruning, layer dropping.

Exactness where the math says so (slicing and pruning at 0 compute the original function, against
transformers' logits), agreement of every executor on the compressed files (numpy backend,
onnxruntime backend, exported ONNX in bare onnxruntime), importance that really finds planted
unimportant structures, and one-line errors for bad options.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from tiny_models import FAMILIES, hf_logits, make_tiny
from refusals import assert_convert_refuses

torch = pytest.importorskip("torch")

from llmpack.converter import convert  # noqa: E402
from llmpack.formats import LlmpackError, Pack  # noqa: E402
from llmpack.runtime import load  # noqa: E402

CALIB = dict(calib_samples=4, calib_seqlen=32)
IDS = [int(t) for t in np.random.default_rng(3).integers(2, 290, 30)]
SLICEABLE = [f for f in FAMILIES if f != "gemma3_text"]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def logits_both(path):
    """(numpy logits, onnxruntime logits at accuracy level 0, incremental numpy logits)."""
    np_model = load(path, backend="numpy")
    ort_model = load(path, backend="onnxruntime", accuracy_level=0)
    cache = np_model.backend.new_cache()
    inc = np.concatenate([np_model.backend.forward(IDS[:20], cache)] + [np_model.backend.forward([t], cache)
                                                                       for t in IDS[20:]])
    return np_model.logits(IDS), ort_model.logits(IDS), inc


@pytest.mark.parametrize("family", SLICEABLE)
def test_slice_zero_is_the_original_function(family, tiny_ckpts, tmp_path):
    """--slice 0 runs the whole SliceGPT path (LayerNorm -> RMSNorm by centering, norms folded,
    a full PCA rotation of every block, shortcut matrices) and must change nothing."""
    model, folder = tiny_ckpts(family)
    out = tmp_path / "s0.llmpack"
    convert(folder, out, dtype="f32", slice=0, quiet=True, **CALIB)
    names = Pack(out).tensors
    assert "layers.0.shortcut.weight" in names and "head.weight" in names  # rotated, untied
    want = hf_logits(model, IDS)
    for got in logits_both(out):
        assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_zero_is_the_original_function(family, tiny_ckpts, tmp_path):
    model, folder = tiny_ckpts(family)
    out = tmp_path / "p0.llmpack"
    convert(folder, out, dtype="f32", prune_mlp=0, prune_heads=0, quiet=True, **CALIB)
    want = hf_logits(model, IDS)
    for got in logits_both(out):
        assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("family,options", [
    ("llama", dict(slice=0.25)),
    ("phi", dict(slice=0.25, prune_mlp=0.25)),
    ("gpt2", dict(slice=0.2, prune_heads=1)),
    ("qwen2", dict(slice=0.25, prune_heads=0.5, prune_mlp=0.5, drop_layers=1, bits=4, method="gptq")),
    ("gemma3_text", dict(prune_heads=1, prune_mlp=0.3, drop_layers=2)),
    ("opt", dict(slice=0.5, bits=4, method="rtn")),  # width 32: whole groups in the toy model
])
def test_compressed_files_agree_across_executors_and_are_smaller(family, options, tiny_ckpts, tmp_path):
    from test_export_onnx import BareDecoder

    from llmpack.runtime.cmd_export_onnx import export_onnx

    _, folder = tiny_ckpts(family)
    plain, small = tmp_path / "plain.llmpack", tmp_path / "small.llmpack"
    base = {"bits": options["bits"], "method": "rtn"} if "bits" in options else {"dtype": "f32"}
    convert(folder, plain, quiet=True, **base, **CALIB)
    convert(folder, small, quiet=True, **({"dtype": "f32"} if "bits" not in options else {}), **options, **CALIB)
    assert small.stat().st_size < plain.stat().st_size
    got_np, got_ort, inc = logits_both(small)
    assert rel(got_ort, got_np) <= 1e-5 and rel(inc, got_np) <= 1e-5
    export_onnx(small, tmp_path / "onnx", accuracy_level=0)
    assert rel(BareDecoder(tmp_path / "onnx")(IDS), got_np) <= 1e-5
    first = ("drop_layers" if "drop_layers" in options else "slice" if "slice" in options
             else "prune" if {"prune_mlp", "prune_heads"} & set(options) else "quantize")
    assert Pack(small).header["recipe"][0]["step"] == first


def _planted(folder, family, tmp_path, edit):
    """A copy of the checkpoint with weights edited by edit(state_dict)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "planted"
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_pruning_removes_planted_unimportant_neurons_and_heads(tiny_ckpts, tmp_path):
    _, folder = tiny_ckpts("llama")
    weak_neurons = [3, 17, 40, 41, 60, 71]  # of 72
    # KV group 1 of 2 (query heads 2 and 3: o_proj columns 32..63) is made weak

    def edit(sd):
        for i in range(3):
            sd[f"model.layers.{i}.mlp.down_proj.weight"][:, weak_neurons] *= 1e-3
            sd[f"model.layers.{i}.self_attn.o_proj.weight"][:, 32:64] *= 1e-3
    src = _planted(folder, "llama", tmp_path, edit)
    out = tmp_path / "pruned.llmpack"
    convert(src, out, dtype="f32", prune_mlp=len(weak_neurons) / 72, prune_heads=1, quiet=True, **CALIB)
    pack = Pack(out)
    import safetensors.numpy as stn

    sd = stn.load_file(str(src / "model.safetensors"))
    for i in range(3):
        down = sd[f"model.layers.{i}.mlp.down_proj.weight"]
        kept = [j for j in range(72) if j not in weak_neurons]
        assert np.array_equal(pack.array(f"layers.{i}.mlp.down.weight"), down[:, kept])
        o = sd[f"model.layers.{i}.self_attn.o_proj.weight"]
        assert np.array_equal(pack.array(f"layers.{i}.attn.o.weight"), o[:, :32])  # group 0 kept
        k = sd[f"model.layers.{i}.self_attn.k_proj.weight"]
        assert np.array_equal(pack.array(f"layers.{i}.attn.k.weight"), k[:16])


def test_layer_drop_removes_the_planted_near_identity_layer(tiny_ckpts, tmp_path):
    _, folder = tiny_ckpts("mistral")

    def edit(sd):  # layer 1 barely touches the residual stream
        sd["model.layers.1.self_attn.o_proj.weight"] *= 1e-4
        sd["model.layers.1.mlp.down_proj.weight"] *= 1e-4
    src = _planted(folder, "mistral", tmp_path, edit)
    out = tmp_path / "dropped.llmpack"
    convert(src, out, dtype="f32", drop_layers=1, quiet=True, **CALIB)
    h = Pack(out).header
    assert h["recipe"][0]["dropped"][0][0] == 1 and h["model"]["n_layers"] == 2
    import safetensors.numpy as stn

    sd = stn.load_file(str(src / "model.safetensors"))
    assert np.array_equal(Pack(out).array("layers.1.mlp.up.weight"), sd["model.layers.2.mlp.up_proj.weight"])


def test_gemma3_all_sliding_layers_after_dropping(tmp_path):
    """Dropping layers can leave only one attention kind: the kept layers still convert and run
    (a 3-layer Gemma-3 whose layers are all sliding-window once did not load)."""
    model = make_tiny("gemma3_text", tmp_path / "g", num_hidden_layers=3)
    out = tmp_path / "g.llmpack"
    convert(tmp_path / "g", out, dtype="f32", quiet=True)
    got_np, got_ort, _ = logits_both(out)
    want = hf_logits(model, IDS)
    assert rel(got_np, want) <= 1e-5 and rel(got_ort, want) <= 1e-5
    convert(tmp_path / "g", tmp_path / "d.llmpack", dtype="f32", drop_layers=2, quiet=True, **CALIB)
    got_np, got_ort, _ = logits_both(tmp_path / "d.llmpack")
    assert rel(got_ort, got_np) <= 1e-5


@pytest.mark.parametrize("args,message", [
    (["--slice", "1.2"], "--slice 1.2"),
    (["--drop-layers", "3"], "--drop-layers 3: the model has 3 layers"),
    (["--prune-heads", "2"], "--prune-heads 2: layers have 2 KV head groups"),
    (["--prune-mlp", "-0.1"], "--prune-mlp -0.1"),
    (["--prune-heads", "1.5"], "--prune-heads 1.5"),
])
def test_bad_structure_options_are_one_line_errors(args, message, tiny_ckpts, tmp_path):
    assert_convert_refuses(tiny_ckpts("llama")[1], tmp_path, args, message)


def test_slicing_gemma3_is_refused(tiny_ckpts, tmp_path):
    _, folder = tiny_ckpts("gemma3_text")
    with pytest.raises(LlmpackError, match="sandwich norms"):
        convert(folder, tmp_path / "x.llmpack", slice=0.2, quiet=True)


def test_recipe_is_recorded_and_shown(tiny_ckpts, tmp_path):
    _, folder = tiny_ckpts("qwen2")
    out = tmp_path / "r.llmpack"
    convert(folder, out, slice=0.25, prune_mlp=0.25, bits=4, method="gptq", quiet=True, **CALIB)
    recipe = Pack(out).header["recipe"]
    assert [r["step"] for r in recipe] == ["slice", "prune", "quantize"]
    assert recipe[0]["fraction"] == 0.25 and recipe[0]["width"] == 48 and recipe[1]["removed_neurons"] == 3 * 18
    assert Pack(out).tensors["layers.0.mlp.up.weight"]["shape"] == [54, 48]
    shown = subprocess.run([sys.executable, "-m", "llmpack", "inspect", str(out)], capture_output=True, text=True)
    assert shown.returncode == 0 and "recipe      slice (fraction 0.25, width 48" in shown.stdout, shown.stdout
    json.dumps(recipe)
