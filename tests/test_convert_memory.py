"""Conversion memory stays near one layer: peak RSS does not grow with the number of layers.

Two synthetic bf16 checkpoints of the same width (hidden 256, MLP 1024: 2 MB of bf16, 4 MB of
float32 a layer) but 6 and 48 layers are converted in fresh subprocesses, and their peak resident
sets (getrusage's ru_maxrss of the child) compared. The 42 extra layers are 88 MB of checkpoint
and 176 MB of float32: a converter that keeps the mapped checkpoint pages resident (as the
safetensors memory map did), or holds every layer, or buffers the output, exceeds the 40 MB
margin; one that holds a layer at a time stays within a few MB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from synth_checkpoint import synthesize  # noqa: E402

MARGIN_MB = 40
WIDE = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=160, bos_token_id=0, eos_token_id=1,
            tie_word_embeddings=False)

CHILD = """
import json, resource, sys
from llmpack.converter.convert import convert
convert(sys.argv[1], sys.argv[2], quiet=True, **json.loads(sys.argv[3]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_mb(src: Path, out: Path, options: dict) -> float:
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), json.dumps(options)],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 0
    return int(r.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("depth")
    out = {}
    for n in (6, 48):
        out[n] = synthesize(base / f"l{n}", "llama", dict(WIDE, num_hidden_layers=n), quiet=True)
    return out


@pytest.mark.parametrize("options", [
    {"bits": 4},
    {"dtype": "f16"},
    {"bits": 4, "method": "gptq", "calib_samples": 2, "calib_seqlen": 32},
], ids=["rtn-q4", "f16", "gptq-q4"])
def test_peak_memory_is_flat_in_depth(checkpoints, tmp_path, options):
    shallow = _peak_mb(checkpoints[6], tmp_path / "l6.llmpack", options)
    deep = _peak_mb(checkpoints[48], tmp_path / "l48.llmpack", options)
    src_mb = sum(f.stat().st_size for f in checkpoints[48].glob("*.safetensors")) / 2**20
    assert src_mb > 2 * MARGIN_MB  # the test can fail: the deep checkpoint dwarfs the margin
    print(f"peak RSS: 6 layers {shallow:.0f} MB, 48 layers {deep:.0f} MB (checkpoint {src_mb:.0f} MB)")
    assert deep - shallow < MARGIN_MB, (shallow, deep, src_mb)


def test_applied_linears_are_released_before_the_down_projection(tmp_path, monkeypatch):
    """GPTQ's peak is the down projection's step (its Hessian is the widest): by then the block's
    other quantized linears have been applied, and their dequantized copies are released (a
    parallel phi block and a sequential llama block alike). The written file is the same tensor
    for tensor as with the copies kept."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import make_tiny, stored_parts

    from llmpack.converter import convert
    from llmpack.converter.quantize import step as qstep

    real = qstep.release_applied
    for family, gated in (("llama", True), ("phi", False)):
        make_tiny(family, tmp_path / family)
        released, files = [], []
        for release in (False, True):
            def spy(s, t, prefix, keep, release=release):
                before = {k for k, v in t.items() if v.ndim == 2 and v.strides != (0, 0)}
                if release:
                    real(s, t, prefix, keep)
                released.append(sorted(k for k in before if t[k].strides == (0, 0)))
            monkeypatch.setattr(qstep, "release_applied", spy)
            out = tmp_path / f"{family}-{release}.llmpack"
            convert(tmp_path / family, out, bits=4, method="gptq", calib_samples=2, calib_seqlen=32, quiet=True)
            files.append(stored_parts(out))
        applied = ["attn.k.weight", "attn.o.weight", "attn.q.weight", "attn.v.weight"] + \
            (["mlp.gate.weight", "mlp.up.weight"] if gated else ["mlp.up.weight"])
        n = len(released) // 2
        assert released[:n] == [[]] * n and released[n:] == [applied] * n, released
        assert files[0] == files[1]
