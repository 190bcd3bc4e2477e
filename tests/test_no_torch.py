"""The runtime never needs torch or transformers: load a pack, compute logits, generate, and run
`llmpack generate` in subprocesses where importing either one fails."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tiny_models import hf_logits, make_tiny

BLOCKED = ("torch", "transformers")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A pack built here, the reference logits, and an environment in which torch/transformers
    cannot be imported (stub packages first on PYTHONPATH that raise ImportError)."""
    from llmpack.converter import convert

    root = tmp_path_factory.mktemp("no_torch")
    model = make_tiny("qwen2", root / "ckpt")
    convert(root / "ckpt", root / "m.llmpack", dtype="f16", quiet=True)
    ids = list(range(5, 25))
    np.save(root / "ref.npy", hf_logits(model, ids))
    stubs = root / "stubs"
    for name in BLOCKED:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked: the llmpack runtime must not import it')\n")
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(stubs)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    e.pop("LLMPACK_DEBUG", None)
    return root, e, ids


def run(args, env_vars, cwd):
    return subprocess.run(args, env=env_vars, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_block_works(env):
    root, e, _ = env
    for name in BLOCKED:
        r = run([sys.executable, "-c", f"import {name}"], e, root)
        assert r.returncode != 0 and "is blocked" in r.stderr, r.stderr


SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llmpack.runtime import load

    ids = json.loads(sys.argv[2])
    rt = load(sys.argv[1], backend="numpy")
    logits = rt.logits(ids)
    ref = np.load(sys.argv[3])
    err = float(np.abs(logits - ref).max() / np.abs(ref).max())
    new = list(rt.generate_ids(ids[:8], 6, temperature=0.0, stop=False))
    text = "".join(rt.generate("hello world", 5, temperature=0.0))
    blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    print(json.dumps({"err": err, "new": new, "text": text, "blocked": blocked}))
""")


def test_runtime_api_without_torch(env):
    root, e, ids = env
    r = run([sys.executable, "-c", SCRIPT, str(root / "m.llmpack"), json.dumps(ids), str(root / "ref.npy")], e, root)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["blocked"] == []
    assert out["err"] < 5e-3  # an f16 pack against the f32 transformers model
    assert len(out["new"]) == 6
    # the same numbers as in this (torch-importing) process
    from llmpack.runtime import load

    rt = load(root / "m.llmpack", backend="numpy")
    assert out["new"] == list(rt.generate_ids(ids[:8], 6, temperature=0.0, stop=False))
    assert out["text"] == "".join(rt.generate("hello world", 5, temperature=0.0))


@pytest.mark.parametrize("backend", ["numpy", None], ids=["numpy", "default"])
def test_generate_cli_without_torch(env, backend):
    root, e, _ = env
    args = [sys.executable, "-c",
            "import sys; from llmpack.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            "print('\\nIMPORTED', bad, file=sys.stderr); sys.exit(rc)",
            "generate", str(root / "m.llmpack"), "-p", "hello", "-n", "5", "--seed", "0"]
    if backend:
        args += ["--backend", backend]
    r = run(args, e, root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello")
    assert "Traceback" not in r.stderr
    assert "IMPORTED []" in r.stderr


def test_console_script_without_torch(env):
    """`python -m llmpack`, as a user runs it."""
    root, e, _ = env
    r = run([sys.executable, "-m", "llmpack", "generate", str(root / "m.llmpack"), "-p", "hello", "-n", "3",
             "--backend", "numpy"], e, root)
    assert r.returncode == 0 and r.stdout.startswith("hello"), r.stderr
    assert "Traceback" not in r.stderr
