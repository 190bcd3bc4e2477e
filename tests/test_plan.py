"""--target-size and --plan-only (converter/plan.py) on a tiny qwen2: the written file is at or
under the target and within 2 % of it, the frontier, the recorded plan, option errors."""
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from tiny_models import make_tiny

from llmpack.converter import convert
from llmpack.converter import plan as plan_mod
from llmpack.converter.quantize import calib as calib_mod
from llmpack.formats import LlmpackError, Pack
from llmpack.runtime import load

CALIB = dict(calib_samples=4, calib_seqlen=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny qwen2 checkpoint, a calibration file and one shared sensitivity measurement."""
    root = tmp_path_factory.mktemp("plan")
    make_tiny("qwen2", root / "ckpt")
    calib = root / "calib.txt"
    calib.write_text(calib_mod.default_text()[:20000])
    sens = root / "sens.json"
    frontier = convert(root / "ckpt", root / "frontier.llmpack", plan_only=True, calib=calib, sensitivity_file=sens,
                       quiet=True, **CALIB)
    return {"ckpt": root / "ckpt", "calib": calib, "sens": sens, "frontier": frontier}


def _kw(setup, **extra):
    return dict(calib=setup["calib"], sensitivity_file=setup["sens"], quiet=True, **CALIB, **extra)


def _plan_record(header):
    return next(r for r in header["recipe"] if r["step"] == "plan")


def _written_types(header) -> dict:
    """The quantized tensors' types as the plan record counts them ("q4g32": n)."""
    return dict(Counter(f"{t['type']}g{t['group_size']}" for t in header["tensors"] if t["type"].startswith("q")))


def test_parse_size_forms():
    assert plan_mod.parse_size("126MB").nbytes == 126_000_000
    assert plan_mod.parse_size("120MiB").nbytes == 120 * 2**20
    assert plan_mod.parse_size("1.5GB").nbytes == 1_500_000_000
    assert plan_mod.parse_size("64kB").nbytes == 64_000 and plan_mod.parse_size("2KiB").nbytes == 2048
    assert plan_mod.parse_size("126000000").nbytes == 126_000_000
    t = plan_mod.parse_size("10x")
    assert t.ratio == 10 and t.nbytes is None and t.resolve(1_000_000) == 100_000


@pytest.mark.parametrize("fraction", [0.1, 0.35, 0.6, 0.9])
def test_file_at_or_under_target_and_within_2_percent(fraction, setup, tmp_path):
    """Targets spread between the smallest reachable and the largest useful file: written at or
    under the target, within 2 %; the file holds the recorded choice and runs."""
    lo, hi = setup["frontier"]["smallest_bytes"], setup["frontier"]["largest_bytes"]
    target = int(lo + fraction * (hi - lo))
    out = tmp_path / "t.llmpack"
    h = convert(setup["ckpt"], out, target_size=str(target), **_kw(setup))
    size = out.stat().st_size
    rec = _plan_record(h)
    assert rec["target_bytes"] == target
    assert size <= rec["planned_bytes"] <= target  # the plan is an upper bound of the written size
    assert size >= 0.98 * target, (size, target)
    assert _written_types(h) == rec["types"]  # the file holds the choice the record names
    logits = load(out, backend="numpy").logits(list(range(3, 20)))
    assert np.isfinite(logits).all()


def test_ratio_target_and_eval_prints_predicted_vs_measured(setup, tmp_path, capsys):
    """'3x' of the bf16 source (2 bytes per checkpoint parameter), measured with --eval: the
    quality report fits the header's reserve; predicted and measured KLD printed with their ratio."""
    from safetensors import safe_open

    with safe_open(setup["ckpt"] / "model.safetensors", "np") as f:
        n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    text = setup["ckpt"].parent / "eval.txt"
    text.write_text(calib_mod.default_text()[60000:64000])
    out = tmp_path / "x3.llmpack"
    h = convert(setup["ckpt"], out, target_size="3x", eval_text=str(text), eval_windows=2, eval_ctx=32,
                **dict(_kw(setup), quiet=False))
    err = capsys.readouterr().err
    target = 2 * n_params // 3
    assert _plan_record(h)["target_bytes"] == target
    assert 0.98 * target <= out.stat().st_size <= target
    q = h["quality"][0]
    m = re.search(r"plan: predicted KLD ([0-9.e-]+), measured ([0-9.e-]+) \(measured/predicted ([0-9.]+)\)", err)
    assert m, err
    assert float(m.group(2)) == pytest.approx(q["kld"], abs=1e-5)


def test_plan_only_frontier_table_and_png_no_pack(setup, tmp_path, capsys):
    from llmpack.cli import main

    out = tmp_path / "p.llmpack"
    code = main(["convert", str(setup["ckpt"]), "-o", str(out), "--plan-only", "--calib", str(setup["calib"]),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--sensitivity", str(setup["sens"]), "-q"])
    assert code == 0
    assert not out.exists() and not list(tmp_path.glob(".p.llmpack*"))
    png = tmp_path / "p.plan.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    targets = [int(r[0].replace(",", "")) for r in rows]
    planned = [int(r[1].replace(",", "")) for r in rows]
    # the damage the frontier minimizes: the predicted bits/byte ratio when the vocabulary is weighed
    damage = [float(r[7].rstrip("x")) if len(r) > 7 and r[7].endswith("x") else float(r[5]) for r in rows]
    assert len(rows) >= 8
    assert all(a < b for a, b in zip(targets, targets[1:]))
    assert all(p <= t for p, t in zip(planned, targets))
    assert all(b <= a for a, b in zip(damage, damage[1:]))
    assert damage[0] > damage[-1]


def test_inspect_shows_the_plan(setup, tmp_path, capsys):
    from llmpack.cli import main

    lo, hi = setup["frontier"]["smallest_bytes"], setup["frontier"]["largest_bytes"]
    out = tmp_path / "i.llmpack"
    h = convert(setup["ckpt"], out, target_size=f"{(lo + hi) // 2000}kB", **_kw(setup))
    rec = _plan_record(h)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("recipe"))
    assert f"plan (target_size {(lo + hi) // 2000}kB, target_bytes {rec['target_bytes']}" in line
    assert f"predicted_kld {rec['predicted_kld']}" in line
    assert "types " + ",".join(f'"{k}":{v}' for k, v in rec["types"].items()) in line.replace("{", "").replace("}", "")


def test_target_below_smallest_is_one_line_error(setup, tmp_path):
    """CLI subprocess: one stderr line naming the smallest reachable size, non-zero exit, nothing
    written; and that size is indeed reachable."""
    lo = setup["frontier"]["smallest_bytes"]
    small = str(10 ** (len(str(lo)) - 1))  # as many digits as `lo`: the header records the target text
    args = [sys.executable, "-m", "llmpack", "convert", str(setup["ckpt"]), "-o", "out.llmpack",
            "--target-size", small, "--calib", str(setup["calib"]), "--calib-samples", "4", "--calib-seqlen", "64",
            "--sensitivity", str(setup["sens"]), "-q"]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    m = re.search(r"below the smallest reachable file, ([0-9,]+) bytes", lines[0])
    assert m, lines[0]
    assert list(tmp_path.iterdir()) == []
    smallest = int(m.group(1).replace(",", ""))
    assert len(str(smallest)) == len(small)
    out = tmp_path / "s.llmpack"
    convert(setup["ckpt"], out, target_size=str(smallest), **_kw(setup))
    assert out.stat().st_size <= smallest
    assert all(t["type"] == "q2" for t in Pack(out).header["tensors"] if t["type"].startswith("q"))


@pytest.mark.parametrize("extra, expect", [
    (["--target-size", "1MB", "--bits", "4"], "drop --bits"),
    (["--target-size", "1MB", "--target-bpw", "4"], "drop --target-bpw"),
    (["--target-size", "12QB"], "give a positive size: bytes (126000000), kB/MB/GB"),
    (["--target-size=-5MB"], "give a positive size"),
    (["--target-size", "0x"], "give a positive size"),
    (["--target-size", "1MB", "--slice", "0.2"], "--target-bpw/--target-size measure the unpruned model"),
])
def test_bad_options_fail_cleanly(extra, expect, setup, tmp_path, capsys):
    from llmpack.cli import main

    out = tmp_path / "out.llmpack"
    code = main(["convert", str(setup["ckpt"]), "-o", str(out), "-q"] + extra)
    err = capsys.readouterr().err
    assert code != 0 and expect in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_keep_counts_as_fixed_bytes(setup, tmp_path):
    """A --keep'd matrix is no choice of the planner but its bytes count: still at or under, within 2 %."""
    lo, hi = setup["frontier"]["smallest_bytes"], setup["frontier"]["largest_bytes"]
    target = (lo + hi) // 2
    out = tmp_path / "k.llmpack"
    h = convert(setup["ckpt"], out, target_size=str(target), keep=["embed=f16"],
                **dict(_kw(setup), sensitivity_file=None))
    assert next(t for t in h["tensors"] if t["name"] == "embed.weight")["type"] == "f16"
    assert 0.98 * target <= out.stat().st_size <= target


def test_target_above_the_largest_useful_file_writes_that(setup, tmp_path, capsys):
    hi = setup["frontier"]["largest_bytes"]
    out = tmp_path / "big.llmpack"
    h = convert(setup["ckpt"], out, target_size=str(10 * hi), **dict(_kw(setup), quiet=False))
    assert "at or above the largest useful file" in capsys.readouterr().err
    assert out.stat().st_size <= _plan_record(h)["planned_bytes"] <= hi + 64
    assert all(t["type"] == "q8" for t in h["tensors"] if t["type"].startswith("q"))


def test_plan_only_into_a_missing_folder_fails_before_measuring(setup, tmp_path, capsys):
    from llmpack.cli import main

    code = main(["convert", str(setup["ckpt"]), "-o", str(tmp_path / "no" / "p.llmpack"), "--plan-only", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def full_vocab_smallest(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("keep") / "f.llmpack"
    return convert(setup["ckpt"], out, plan_only=True, keep_vocab=True, **_kw(setup))["smallest_bytes"]


def test_planner_trims_the_vocabulary_to_reach_a_target(setup, full_vocab_smallest, tmp_path):
    """A target below every full-vocabulary file is reached by trimming: the file is at or under
    it, records the chosen vocabulary, holds that many rows, and reads text."""
    assert setup["frontier"]["smallest_bytes"] < full_vocab_smallest
    target = (setup["frontier"]["smallest_bytes"] + full_vocab_smallest) // 2
    out = tmp_path / "v.llmpack"
    h = convert(setup["ckpt"], out, target_size=str(target), **_kw(setup))
    rec = _plan_record(h)
    n = rec["vocab"]["size"]
    assert out.stat().st_size <= target and n is not None
    assert [r["step"] for r in h["recipe"]] == ["plan", "vocab", "quantize"]
    assert next(t for t in h["tensors"] if t["name"] == "embed.weight")["shape"][0] == n
    assert rec["vocab"]["damage_nats_per_byte"] >= 0 and rec["predicted_bpb_ratio"] >= 1
    m = load(out, backend="numpy")
    ids = m.tokenizer.encode("def main():\n    return 0\n")
    assert max(ids) < n and m.logits(ids).shape == (len(ids), n)


def test_keep_vocab_and_vocab_size_pin_the_vocabulary(setup, full_vocab_smallest, tmp_path):
    target = (setup["frontier"]["smallest_bytes"] + full_vocab_smallest) // 2
    with pytest.raises(LlmpackError, match="smallest reachable file") as e:
        convert(setup["ckpt"], tmp_path / "k.llmpack", target_size=str(target), keep_vocab=True, **_kw(setup))
    named = int(re.search(r"file, ([0-9,]+) bytes", str(e.value)).group(1).replace(",", ""))
    assert abs(named - full_vocab_smallest) < 64  # the header holds the target's text: a few bytes apart
    assert not (tmp_path / "k.llmpack").exists()
    out = tmp_path / "n.llmpack"
    h = convert(setup["ckpt"], out, target_size=str(full_vocab_smallest + 4000), vocab_size=280, **_kw(setup))
    assert _plan_record(h)["vocab"]["size"] == 280 and out.stat().st_size <= full_vocab_smallest + 4000
    assert next(t for t in h["tensors"] if t["name"] == "embed.weight")["shape"][0] == 280


def test_vocabulary_damage_is_measured_on_text_the_tokens_were_not_counted_on(setup):
    from llmpack.converter import plan_vocab
    from llmpack.converter.recipe import Recipe

    recipe = Recipe.from_options(target_size="1MB", calib=setup["calib"])
    measured, counted, corpus = plan_vocab._split(recipe)  # the corpus: the shipped text, the calibration a prefix
    assert len(measured) > 1000 and setup["calib"].read_text().endswith(measured)
    assert len(counted) == 1 and measured not in counted[0] and "without the text" in corpus
    assert len(counted[0]) == len(calib_mod.default_text()) - len(measured)


def test_inspect_shows_a_trimmed_files_step_quality_in_bits_per_byte(setup, tmp_path):
    out = tmp_path / "v.llmpack"
    convert(setup["ckpt"], out, vocab_size=280, bits=4, eval_text=calib_mod.default_eval_path(), eval_windows=2,
            eval_ctx=32, quiet=True)
    shown = subprocess.run([sys.executable, "-m", "llmpack", "inspect", str(out)], capture_output=True, text=True)
    line = next(x for x in shown.stdout.splitlines() if "-> quantize (" in x)
    assert "[then bits/byte x" in line and "where read alike]" in line, shown.stdout


@pytest.mark.parametrize("tokens", [512, "auto"])
def test_target_size_with_healing_fits_and_keeps_the_plan(tokens, setup, full_vocab_smallest, tmp_path, monkeypatch):
    """--target-size --heal: the planner sets the healing records aside (with auto, a token count
    per block at its widest), so the healed and measured file is still at or under the target
    (within 2 %); the file holds the planned types and its end-to-end KL falls (auto: never
    rises, its best round is kept); with a trimmed vocabulary the teacher and the student read
    the same calibration tokens."""
    from llmpack.converter.heal.run import Healing
    from llmpack.converter.heal.teacher import Teacher

    target = full_vocab_smallest + 6000  # room for the report and healing's records (~2 kB here)
    text = setup["ckpt"].parent / "eval.txt"
    text.write_text(calib_mod.default_text()[60000:64000])
    plain, healed = tmp_path / "p.llmpack", tmp_path / "h.llmpack"
    kw = dict(target_size=str(target), eval_text=str(text), eval_windows=2, eval_ctx=32, **_kw(setup))
    kw["vocab_size"] = 262  # the planner's trimming path, pinned: the calibration text uses removed tokens
    hp = convert(setup["ckpt"], plain, **kw)
    seen = {}
    teacher_pre, finish = Teacher.pre, Healing.finish
    monkeypatch.setattr(Teacher, "pre", lambda self, s, pre: (seen.update(teacher=s.ids), teacher_pre(self, s, pre)))
    monkeypatch.setattr(Healing, "finish", lambda self, ids, amend=None: (
        seen.update(student=ids, new_of_old=self.new_of_old), finish(self, ids, amend))[1])
    hh = convert(setup["ckpt"], healed, heal=True, heal_tokens=tokens, **kw)
    # the student trains on the teacher's tokens, in the trimmed ids
    assert np.array_equal(seen["new_of_old"][seen["teacher"]], seen["student"])
    assert 0.98 * target <= healed.stat().st_size <= target
    steps = [r["step"] for r in hh["recipe"]]
    assert steps[0] == "plan" and "vocab" in steps and steps[-2:] == ["heal_blocks", "heal_e2e"], steps
    assert _written_types(hh) == _plan_record(hh)["types"]  # healing trains scales and norms, never a type
    # what healing's records cost: the same target without it plans a little more
    assert _plan_record(hh)["planned_bytes"] <= _plan_record(hp)["planned_bytes"]
    kl = hh["recipe"][-1]["kl"]
    assert kl["after"] < kl["before"] if tokens != "auto" else kl["after"] <= kl["before"]
    assert hh["quality"][0]["bpb_ratio"] > 0 and not list(tmp_path.glob("*.heal"))


def test_plan_only_with_heal_is_one_line_error(setup, tmp_path, capsys):
    from llmpack.cli import main

    code = main(["convert", str(setup["ckpt"]), "-o", str(tmp_path / "p.llmpack"), "--plan-only", "--heal", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "nothing to heal" in err and len(err.strip().splitlines()) == 1, err
