"""`convert --eval` records the quality after each step of a recipe (converter/step_quality.py).

Trusted results: a recipe whose later step cannot change what the earlier one saw (RTN
quantization happens as each tensor is written, so pruning calibrates on pruned float blocks
exactly as a pruning-only conversion does) must record, after pruning, the figures that the
pruning-only file measures on its own against transformers; an exact step (slicing at 0)
must record the quality of the step before it; the last step records the finished file's.
"""
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from llmpack.converter import convert  # noqa: E402
from llmpack.converter.quantize.calib import default_eval_path  # noqa: E402
from llmpack.formats import Pack  # noqa: E402

EVAL = dict(eval_text=default_eval_path(), eval_windows=3, eval_ctx=48)
CALIB = dict(calib_samples=4, calib_seqlen=32)


def recipe_of(path):
    return Pack(path).header["recipe"]


def test_quality_after_pruning_equals_the_pruned_file_measured_alone(tiny_ckpts, tmp_path):
    _, folder = tiny_ckpts("llama")
    both = tmp_path / "prune-q4.llmpack"
    convert(folder, both, prune_mlp=0.5, bits=4, dtype="f32", quiet=True, **CALIB, **EVAL)
    alone = tmp_path / "prune.llmpack"
    convert(folder, alone, prune_mlp=0.5, dtype="f32", quiet=True, **CALIB, **EVAL)
    steps = recipe_of(both)
    assert [r["step"] for r in steps] == ["prune", "quantize"]
    after_prune, measured_alone = steps[0]["quality"], Pack(alone).header["quality"][0]
    assert measured_alone["kld"] > 1e-5  # pruning half the MLP really costs something (tiny random model)
    assert after_prune["kld"] == pytest.approx(measured_alone["kld"], rel=1e-3)
    assert after_prune["top1"] == pytest.approx(measured_alone["top1"], abs=1e-6)
    assert after_prune["ppl_ratio"] == pytest.approx(measured_alone["ppl_ratio"], rel=1e-5)
    final = Pack(both).header["quality"][0]
    assert steps[1]["quality"]["kld"] == pytest.approx(final["kld"], rel=1e-6)
    assert steps[1]["quality"]["kld"] > after_prune["kld"]  # quantizing on top costs more


def test_every_step_of_a_composed_recipe_is_measured(tiny_ckpts, tmp_path):
    """drop -> slice 0 -> prune -> GPTQ q4: figures after each; slicing at 0 changes nothing."""
    _, folder = tiny_ckpts("mistral")
    out = tmp_path / "all.llmpack"
    convert(folder, out, drop_layers=1, slice=0.0, prune_mlp=0.25, bits=4, method="gptq", quiet=True,
            **CALIB, **EVAL)
    steps = recipe_of(out)
    assert [r["step"] for r in steps] == ["drop_layers", "slice", "prune", "quantize"]
    q = [r["quality"] for r in steps]
    assert q[0]["kld"] > 1e-5  # one of two layers gone
    assert q[1]["kld"] == pytest.approx(q[0]["kld"], rel=1e-4, abs=1e-7)  # the exact rotation
    assert q[1]["top1"] == q[0]["top1"]
    assert q[3]["kld"] == pytest.approx(Pack(out).header["quality"][0]["kld"], rel=1e-6)
    assert all(x["windows"] == 3 and x["ctx"] == 48 for x in q)
    shown = subprocess.run([sys.executable, "-m", "llmpack", "inspect", str(out)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    lines = [ln for ln in shown.stdout.splitlines() if "[then KLD" in ln]
    assert len(lines) == 4 and lines[0].startswith("recipe      drop_layers") and "-> prune" in lines[2], shown.stdout


def test_without_eval_nothing_is_measured(tiny_ckpts, tmp_path):
    _, folder = tiny_ckpts("llama")
    out = tmp_path / "p.llmpack"
    convert(folder, out, prune_mlp=0.25, bits=4, quiet=True, **CALIB)
    assert all("quality" not in r for r in recipe_of(out)) and Pack(out).header["quality"] == []
