"""The size planner's structural side (converter/plan_structure.py): blocks dropped and MLP
neurons pruned when their measured damage buys more than the bytes would as bits."""
import numpy as np
import pytest
import torch

from tiny_models import hf_logits, make_tiny

from llmpack.converter import convert
from llmpack.converter.quantize import calib as calib_mod
from llmpack.formats import LlmpackError, Pack
from llmpack.runtime import load

CALIB = dict(calib_samples=4, calib_seqlen=64)
IDENTITY_BLOCK = 2
DEAD = 30  # of 72 MLP neurons in every block: their down-projection columns are zero


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 4-block qwen2 whose block 2 is the identity (its attention output and MLP down
    projections are zero) and whose blocks each have 30 dead MLP neurons: dropping that block
    and pruning 25 % of the neurons (18 of 72, all dead) change nothing."""
    root = tmp_path_factory.mktemp("structure")
    model = make_tiny("qwen2", root / "ckpt", num_hidden_layers=4)
    with torch.no_grad():
        layers = model.model.layers
        layers[IDENTITY_BLOCK].self_attn.o_proj.weight.zero_()
        layers[IDENTITY_BLOCK].mlp.down_proj.weight.zero_()
        for layer in layers:
            layer.mlp.down_proj.weight[:, :DEAD] = 0
    model.save_pretrained(root / "ckpt")
    calib = root / "calib.txt"
    calib.write_text(calib_mod.default_text()[:20000])
    kw = dict(calib=calib, sensitivity_file=root / "sens.json", quiet=True, search_structure=True, **CALIB)
    frontier = convert(root / "ckpt", root / "f.llmpack", plan_only=True, **kw)
    return {"ckpt": root / "ckpt", "model": model, "kw": kw, "frontier": frontier, "root": root}


def _rec(header, step):
    return next(r for r in header["recipe"] if r["step"] == step)


def test_free_structure_is_taken_and_the_file_matches_the_original(planted, tmp_path):
    """At the largest useful size (8-bit matrices) the planner still drops the identity block
    and prunes the dead neurons (they cost nothing and free bytes): the file is at or under its
    target, holds 3 blocks of 54 neurons, and its logits are the original's up to 8-bit rounding."""
    f = planted["frontier"]
    assert f["frontier"][-1]["structure"] == "-1L,mlp-25%"
    target = f["largest_bytes"]
    out = tmp_path / "big.llmpack"
    h = convert(planted["ckpt"], out, target_size=str(target), keep_vocab=True, **planted["kw"])
    assert out.stat().st_size <= target
    plan = _rec(h, "plan")
    assert plan["structure"] == {"dropped": [IDENTITY_BLOCK], "mlp": 0.25, "damage": 0.0}
    assert _rec(h, "drop_layers")["dropped"] == [[IDENTITY_BLOCK, 0.0]]
    assert _rec(h, "prune")["removed_neurons"] == 3 * 18
    assert h["model"]["n_layers"] == 3
    shapes = {t["name"]: t["shape"] for t in h["tensors"]}
    assert all(shapes[f"layers.{j}.mlp.down.weight"] == [64, 54] for j in range(3))
    assert "layers.3.attn.q.weight" not in shapes
    ids = list(range(5, 40))
    ref = hf_logits(planted["model"], ids)
    for backend in ("numpy", "onnxruntime"):
        got = load(out, backend=backend).logits(ids)
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max(), backend


def test_mid_target_fits_and_records_the_prediction(planted, tmp_path):
    f = planted["frontier"]
    target = (f["smallest_bytes"] + f["largest_bytes"]) // 2
    out = tmp_path / "mid.llmpack"
    h = convert(planted["ckpt"], out, target_size=str(target), **planted["kw"])
    size = out.stat().st_size
    assert 0.98 * target <= size <= target
    plan = _rec(h, "plan")
    assert plan["structure"]["dropped"] == [IDENTITY_BLOCK] and plan["predicted_kld"] >= 0
    p = Pack(out)
    assert len(p.header["model"]["layers"]) == 3 and p.header["model"]["n_layers"] == 3
    p.close()
    assert np.isfinite(load(out, backend="numpy").logits(list(range(3, 20)))).all()


def test_structure_damage_is_measured_and_cached(planted, capsys, tmp_path):
    """The measurement is kept beside --sensitivity FILE and reused (CLI, --search-structure)."""
    from llmpack.cli import main

    cache = planted["root"] / "sens.json.structure.json"
    assert cache.is_file()
    code = main(["convert", str(planted["ckpt"]), "-o", str(tmp_path / "p.llmpack"), "--plan-only", "--calib",
                 str(planted["kw"]["calib"]), "--calib-samples", "4", "--calib-seqlen", "64", "--sensitivity",
                 str(planted["kw"]["sensitivity_file"]), "--search-structure"])
    captured = capsys.readouterr()
    assert code == 0 and "reused the structure measurement" in captured.err
    assert "-1L,mlp-25%" in captured.out  # the frontier table's structure column
    from llmpack.converter import plan_structure

    import json

    value = json.loads(cache.read_text())["value"]
    assert value["dropped"][0][0] == IDENTITY_BLOCK and value["dropped"][0][1] < 1e-6
    assert all(d < 1e-6 for f, d in value["mlp"] if f <= DEAD / 72)
    assert len(plan_structure.candidates(value)) == 2 * (1 + len(plan_structure.MLP_FRACTIONS))


def test_without_search_structure_every_block_is_kept(planted, tmp_path):
    """The search is opt-in (docs/plan.md: it helped at some sizes and hurt at others)."""
    f = planted["frontier"]
    target = f["largest_bytes"]
    out = tmp_path / "k.llmpack"
    h = convert(planted["ckpt"], out, target_size=str(target), keep_vocab=True,
                **dict(planted["kw"], search_structure=False))
    assert "structure" not in _rec(h, "plan") and h["model"]["n_layers"] == 4
    assert [r["step"] for r in h["recipe"]] == ["plan", "quantize"]
    with pytest.raises(LlmpackError, match="--search-structure"):
        convert(planted["ckpt"], tmp_path / "x.llmpack", bits=4, search_structure=True)


def test_a_float_model_too_big_for_memory_is_planned_whole(planted, tmp_path, monkeypatch, capsys):
    """The measurement loads the float model; where that would take more than half the memory
    available (a 7B model on this machine) the planner says so and keeps every block."""
    from llmpack.runtime import numpy_backend

    monkeypatch.setattr(numpy_backend, "available_memory", lambda: 100_000)
    f = convert(planted["ckpt"], tmp_path / "p.llmpack", plan_only=True, **dict(planted["kw"], quiet=False))
    assert "plan: structure not searched: the float model" in capsys.readouterr().err
    assert {row["structure"] for row in f["frontier"]} == {"whole"}
