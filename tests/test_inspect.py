"""`llmpack inspect` and small CLI behaviours through the real command (a subprocess)."""
import re
import subprocess
import sys

import pytest

from tiny_models import make_tiny


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llmpack", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    from llmpack.converter import convert

    root = tmp_path_factory.mktemp("inspect")
    make_tiny("llama", root / "ckpt", num_hidden_layers=2)
    convert(root / "ckpt", root / "q4.llmpack", bits=4, quiet=True)  # RTN, asymmetric, groups of 32
    return root


def test_bits_per_weight_agree_with_provenance_and_are_labelled(q4):
    from llmpack.formats import Pack

    p = cli("inspect", q4 / "q4.llmpack")
    assert p.returncode == 0, p.stderr
    recorded = Pack(q4 / "q4.llmpack").header["provenance"]["options"]["bits_per_weight"]
    weights = re.search(r"^weights +([\d.]+) bits/weight over the 2-D weight matrices \(codes, f16 scales and "
                        r"zero points counted", p.stdout, re.M)
    assert weights and abs(float(weights.group(1)) - recorded) < 5e-4, p.stdout
    assert f"the converter recorded {recorded}" in p.stdout
    assert re.search(r"file [\d.]+ bits/parameter \(every byte of the file over every parameter\)", p.stdout)


def test_provenance_is_a_few_labelled_lines(q4):
    out = cli("inspect", q4 / "q4.llmpack").stdout
    lines = [line for line in out.splitlines() if line.startswith(("provenance", "  options"))]
    assert len(lines) == 2, out
    assert re.match(r"provenance  converter \d+\.\d+\.\d+, [\d.]+ s; source: \d+ files hashed \(sha256\), weights in "
                    r"F32$", lines[0]), lines[0]
    assert "bits 4" in lines[1] and "method rtn" in lines[1] and "{" not in lines[1]
    assert all(len(line) < 200 for line in out.splitlines() if not line.startswith("generation"))


def test_inspect_on_a_folder_says_it_is_a_folder(q4):
    p = cli("inspect", q4 / "ckpt")
    assert p.returncode == 2 and p.stdout == ""
    assert "is a folder, not an llmpack file; pass the .llmpack file" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("listing", [[], ["--tensors"]])
def test_a_closed_pipe_ends_quietly_as_unix_tools_do(q4, listing):
    """`llmpack inspect --tensors F | head -1`: the reader is gone. Here its end of the pipe is closed
    before the command writes anything, so the write fails every time (no race with `head`)."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        p = subprocess.run([sys.executable, "-m", "llmpack", "inspect", *listing, q4 / "q4.llmpack"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert p.returncode == 141  # what a shell shows for a tool that SIGPIPE ended, e.g. `yes | head -1`
    assert p.stderr == ""  # no traceback, no "Exception ignored"


def test_generate_n_has_help():
    out = cli("generate", "--help").stdout
    assert re.search(r"-n MAX_NEW_TOKENS, --max-new-tokens MAX_NEW_TOKENS\s+most new tokens to generate", out)
