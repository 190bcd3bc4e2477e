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

