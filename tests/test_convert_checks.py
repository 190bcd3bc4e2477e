"""The converter refuses what the runtime would refuse (converter/checks.py), with one line naming
the problem and no output file; a killed conversion leaves no pack under any name and the next
conversion of the same output removes its temporary."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from llmpack.formats import FormatError, LlmpackError, Pack
from tiny_models import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    make_tiny("llama", root / "ckpt", num_hidden_layers=2)
    return root / "ckpt"


def _copy(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "ckpt")


def _refused(ckpt, tmp_path, *words):
    from llmpack.converter import convert

    out = tmp_path / "out.llmpack"
    with pytest.raises(LlmpackError) as info:
        convert(ckpt, out, dtype="f32", quiet=True)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written
    return message


def _edit_tensors(ckpt, fn):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _edit_config(ckpt, **fields):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(config, **fields)))


def test_a_tokenizer_that_does_not_parse_is_refused(tiny, tmp_path):
    ckpt = _copy(tiny, tmp_path)
    text = (ckpt / "tokenizer.json").read_text()
    (ckpt / "tokenizer.json").write_text(text[: len(text) // 2])  # cut in the middle: not JSON
    _refused(ckpt, tmp_path, "tokenizer.json", "does not load")


def test_a_generation_config_the_reader_would_refuse_is_refused(tiny, tmp_path):
    ckpt = _copy(tiny, tmp_path)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [[1, 2]]}))
    _refused(ckpt, tmp_path, "generation_config.json", "generation.eos_token_id[0]")


@pytest.mark.parametrize("shape, words", [
    ((64, 60), ("layers.0.attn.q.weight", "model.layers.0.self_attn.q_proj.weight", "(64, 60)", "(rows, 64)")),
    ((60, 64), ("layers.0.attn.q.weight", "(60, 64)", "whole heads of 16")),
    ((48, 64), ("layers.0.attn.q.weight", "(48, 64)", "a multiple of the 2 key/value heads")),
])
def test_a_q_proj_of_the_wrong_shape_is_refused(tiny, tmp_path, shape, words):
    ckpt = _copy(tiny, tmp_path)
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight",
                                                np.zeros(shape, np.float32)))
    _refused(ckpt, tmp_path, *words)


def test_a_down_proj_that_disagrees_with_up_proj_is_refused(tiny, tmp_path):
    ckpt = _copy(tiny, tmp_path)
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.1.mlp.down_proj.weight",
                                                np.zeros((64, 70), np.float32)))
    _refused(ckpt, tmp_path, "layers.1.mlp.down.weight", "(64, 70)", "(64, 72)")


@pytest.mark.parametrize("n", [1, 3])
def test_num_hidden_layers_must_match_the_layers_present(tiny, tmp_path, n):
    ckpt = _copy(tiny, tmp_path)
    _edit_config(ckpt, num_hidden_layers=n)
    _refused(ckpt, tmp_path, f"num_hidden_layers = {n}", "layers 0..1")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny, tmp_path, bad):
    ckpt = _copy(tiny, tmp_path)

    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    _edit_tensors(ckpt, poison)
    _refused(ckpt, tmp_path, "model.layers.1.mlp.up_proj.weight", "NaN" if np.isnan(bad) else "1 infinite")


def test_the_unchanged_checkpoint_converts(tiny, tmp_path):
    from llmpack.converter import convert

    ckpt = _copy(tiny, tmp_path)
    convert(ckpt, tmp_path / "out.llmpack", dtype="f32", quiet=True)
    Pack(tmp_path / "out.llmpack").close()


KILLED_CONVERSION = r"""
import os, sys
from llmpack.converter import convert

real_fsync = os.fsync

def fsync_then_stop(fd):  # the header is on disk and synced; the prefix comes next
    real_fsync(fd)
    print("header written", flush=True)
    sys.stdin.read()  # the parent kills this process (SIGKILL) here

os.fsync = fsync_then_stop
convert(sys.argv[1], sys.argv[2], dtype="f32", quiet=True)
"""


def test_a_conversion_killed_after_the_header_leaves_no_pack_and_the_next_cleans_up(tiny, tmp_path):
    from llmpack.converter import convert

    out = tmp_path / "out" / "m.llmpack"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, str(tiny), str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert line == "header written\n"
    left = list(out.parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(f".m.llmpack.tmp-{child.pid}."), left
    raw = left[0].read_bytes()
    assert raw[:64] == b"\0" * 64 and b'"tensors"' in raw  # tensors and header written, no prefix
    for name in left:  # not a pack under its own name, nor under any other
        shutil.copy(name, tmp_path / "copy.llmpack")
        with pytest.raises(FormatError, match="not an llmpack file"):
            Pack(tmp_path / "copy.llmpack")
    convert(tiny, out, dtype="f32", quiet=True)
    assert [p.name for p in out.parent.iterdir()] == ["m.llmpack"]
    Pack(out).close()


TERMINATED_CONVERSION = """
import os, sys
from llmpack.cli import main

def block(fd):  # the writer is about to sync: the parent terminates this process here
    print("writing", flush=True)
    sys.stdin.read()

os.fsync = block
sys.exit(main(["convert", sys.argv[1], "-o", sys.argv[2], "--dtype", "f32", "-q"]))
"""


def test_a_terminated_conversion_leaves_nothing(tiny, tmp_path):
    """SIGTERM (what `kill`, systemd and container runtimes send) cleans up as Ctrl-C does: exit
    143, one line, no output and no temporary."""
    out = tmp_path / "out" / "m.llmpack"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", TERMINATED_CONVERSION, str(tiny), str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert line == "writing\n"
    assert child.returncode == 143, err
    assert err.strip() == "llmpack convert: terminated (SIGTERM); no output file was written", err
    assert list(out.parent.iterdir()) == []
