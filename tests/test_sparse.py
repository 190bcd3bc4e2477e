"""Sparse quantized storage (q{b}s24, q{b}m) and --sparsity: exact round trips, real byte savings,
both backends and the exported ONNX agreeing, the asked pattern and fraction, Wanda/SparseGPT
selecting what they should, and one-line errors for bad options."""
import json
import struct

import numpy as np
import pytest

from pack_fuzz import with_header_blob
from tiny_models import make_tiny

from llmpack.converter import convert
from llmpack.converter.quantize import calib as calib_mod
from llmpack.converter.quantize import sparsity
from llmpack.converter.quantize.gptq import HessianFactor, gptq_quantize
from llmpack.formats import FormatError, Pack, quant, sparse
from llmpack.formats.spec import part_layout
from llmpack.formats.writer import PackWriter

CALIB = dict(calib_samples=4, calib_seqlen=64, quiet=True)
PROMPT = np.random.default_rng(1).integers(0, 290, 40)
LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def _masked_parts(rng, n, k, bits, g, sym, pattern):
    """Random W pruned by a random mask of the pattern, quantized: (dense parts, kept mask)."""
    W = rng.standard_normal((n, k)).astype(np.float32)
    if pattern == "2:4":
        keep = sparsity.select(sparsity.Sparsity("2:4", 0.5), rng.random((n, k)))
    else:
        keep = rng.random((n, k)) > 0.6
    return quant.quantize_rtn(W * keep, bits, g, sym), keep


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("pattern", ["2:4", "mask"])
@pytest.mark.parametrize("sym", [True, False])
def test_sparse_storage_round_trips_exactly(bits, pattern, sym, tmp_path):
    rng = np.random.default_rng(bits)
    n, k, g = 9, 72, 32  # K not a multiple of the group: padding quads and padding mask bits
    parts, keep = _masked_parts(rng, n, k, bits, g, sym, pattern)
    want = quant.dequantize(parts, (n, k), bits, g)
    assert (want[~keep] == 0).all()
    typ, sp, nnz = sparse.sparsify(parts, bits, g, pattern, mask=keep)
    assert typ == (f"q{bits}s24" if pattern == "2:4" else f"q{bits}m")
    for pname, (dtype, shape) in part_layout(typ, (n, k), g, not sym, nnz).items():
        assert sp[pname].dtype == np.dtype(dtype) and sp[pname].shape == shape, pname
    dense = sparse.expand(sp, typ, (n, k), g, nnz)
    assert set(dense) == set(parts) and all(np.array_equal(dense[p], parts[p]) for p in parts)
    # through a real file: Pack.array dequantizes, rows= gathers (embedding)
    path = tmp_path / "s.llmpack"
    with PackWriter(path) as w:
        w.add("w", typ, (n, k), sp, group_size=g, nnz=nnz)
        w.finish({"model": {}, "tokenizer": {}})
    p = Pack(path)
    assert np.array_equal(p.array("w"), want)
    rows = np.array([4, 0, 4, 8, 1])
    assert np.array_equal(p.array("w", rows=rows), want[rows])
    # the kept codes cost bytes, the pruned ones do not
    dense_codes = parts["data"].nbytes
    assert sp["data"].nbytes < dense_codes * (0.51 if pattern == "2:4" else 0.45)


def _write_masked(path, nnz_claim=None, offsets=None):
    parts, keep = _masked_parts(np.random.default_rng(0), 8, 64, 4, 32, False, "mask")
    typ, sp, nnz = sparse.sparsify(parts, 4, 32, "mask", mask=keep)
    if offsets is not None:
        sp["offsets"] = offsets(sp["offsets"].copy())
    with PackWriter(path) as w:
        w.add("w", typ, (8, 64), sp, group_size=32, nnz=nnz if nnz_claim is None else nnz_claim(nnz))
        w.finish({"model": {}, "tokenizer": {}})


def test_lying_sparse_header_is_a_format_error(tmp_path):
    good = tmp_path / "good.llmpack"
    _write_masked(good)
    raw = good.read_bytes()
    hoff, hlen = struct.unpack_from("<QQ", raw, 16)
    header = json.loads(raw[hoff:])

    def with_entry(**change):
        h = json.loads(json.dumps(header))
        h["tensors"][0].update(change)
        out = tmp_path / "bad.llmpack"
        out.write_bytes(with_header_blob(raw, json.dumps(h).encode()))  # a consistent header checksum
        return out

    nnz = header["tensors"][0]["nnz"]
    for change, msg in [(dict(nnz=nnz + 8), "holds"), (dict(nnz=-1), "nnz"), (dict(nnz=10**6), "nnz"),
                        (dict(nnz="7"), "nnz"), (dict(type="q4s24"), "parts")]:
        with pytest.raises(FormatError, match=msg):
            Pack(with_entry(**change))
    # offsets that disagree with the mask (a consistent checksum, so only the structure is wrong)
    bad = tmp_path / "offsets.llmpack"

    def shift(o):
        o[3] += 1
        return o
    _write_masked(bad, offsets=shift)
    with pytest.raises(FormatError, match="offsets do not match"):
        Pack(bad).array("w")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    # wide enough (K = 256) that the mask type's 32-bit row offsets cost 1/8 bit a weight, as in real models
    make_tiny("llama", root / "ckpt", hidden_size=256, intermediate_size=256)
    calib = root / "calib.txt"
    calib.write_text(calib_mod.default_text()[:20000])
    made = {}

    def get(bits, method="rtn", sparsity=None, group_size=32):
        key = (bits, method, sparsity, group_size)
        if key not in made:
            out = root / f"{bits}-{method}-{str(sparsity).replace(':', '_')}-{group_size}.llmpack"
            convert(root / "ckpt", out, bits=bits, method=method, sparsity=sparsity, calib=calib,
                    group_size=group_size, **CALIB)
            made[key] = out
        return made[key]

    return get


@pytest.mark.parametrize("bits,sp", [(8, "2:4"), (4, "0.5"), (4, "2:4"), (3, "0.5"), (3, "2:4"), (2, "0.7"),
                                     (2, "2:4")])
def test_sparse_file_is_smaller_than_dense(bits, sp, tiny):
    dense, path = tiny(bits), tiny(bits, "rtn", sp)
    pd, ps = Pack(dense), Pack(path)
    layer = [t for t in ps.header["tensors"] if t["name"].startswith("layers.") and t.get("group_size")]
    if (bits, sp) == (2, "2:4"):  # 1 + 1 bits/weight of codes and index: no saving, so kept dense q2
        assert {t["type"] for t in layer} == {"q2"}
        data = [p.path.stat().st_size - len(json.dumps(p.header, separators=(",", ":")).encode()) for p in (ps, pd)]
        assert data[0] == data[1]
        return
    assert path.stat().st_size < dense.stat().st_size
    for t in layer:
        assert t["type"] == (f"q{bits}s24" if sp == "2:4" else f"q{bits}m"), t["name"]
        codes, dense_codes = t["parts"]["data"][1], pd.tensors[t["name"]]["parts"]["data"][1]
        assert codes <= dense_codes * (1 - float(sp.replace("2:4", "0.5")) + 1 / 256) + 1, t["name"]  # per-row rounding
        nbytes = sum(n for _, n, _ in t["parts"].values())
        assert nbytes < sum(n for _, n, _ in pd.tensors[t["name"]]["parts"].values()), t["name"]


@pytest.mark.parametrize("bits,method,sp", [(4, "gptq", "0.5"), (3, "gptq", "2:4"), (2, "rtn", "2:4"),
                                            (8, "awq", "0.3")])
def test_backends_and_export_agree(bits, method, sp, tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from llmpack.runtime import load
    from llmpack.runtime.cmd_export_onnx import export_onnx

    path = tiny(bits, method, sp)
    want = load(path, backend="numpy").logits(PROMPT)
    scale = np.abs(want).max()
    got = load(path, backend="onnxruntime", accuracy_level=0).logits(PROMPT)
    assert np.abs(got - want).max() <= 1e-5 * scale
    out = tmp_path / "onnx"
    export_onnx(path, out, accuracy_level=0)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": PROMPT[None].astype(np.int64), "attention_mask": np.ones((1, len(PROMPT)), np.int64),
            "position_ids": np.arange(len(PROMPT), dtype=np.int64)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    logits = sess.run(["logits"], feed)[0][0]
    assert np.abs(logits - want).max() <= 1e-5 * scale


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_zeros_follow_the_asked_pattern_and_fraction(method, tiny):
    p = Pack(tiny(4, method, "2:4"))
    for i in range(3):
        for lin in LINEARS:
            t = p.tensors[f"layers.{i}.{lin}.weight"]
            assert t["type"] == "q4s24"
            W = p.array(t["name"])
            quads = W.reshape(W.shape[0], -1, 4)
            assert ((quads != 0).sum(-1) <= 2).all()
    assert p.tensors["embed.weight"]["type"] == "q4"  # embedding (tied head) stays dense
    for frac in ("0.5", "0.3"):
        p = Pack(tiny(4, method, frac))
        zeros = total = 0
        for i in range(3):
            for lin in LINEARS:
                name = f"layers.{i}.{lin}.weight"
                assert p.tensors[name]["type"] == "q4m"
                W = p.array(name)
                zeros, total = zeros + (W == 0).sum(), total + W.size
                if method == "rtn":  # Wanda: every row loses exactly round(fraction * K)
                    assert ((W == 0).sum(1) >= round(float(frac) * W.shape[1])).all()
        assert float(frac) <= zeros / total <= float(frac) + 0.05, (frac, zeros / total)


def test_wanda_prunes_planted_unimportant_weights():
    rng = np.random.default_rng(0)
    n, k = 16, 64
    W = (rng.choice([-1, 1], (n, k)) * (0.5 + rng.random((n, k)))).astype(np.float32)  # |W| in [0.5, 1.5)
    x_sq = np.ones(k)
    quiet = rng.permutation(k)[: k // 2]
    x_sq[quiet] = 1e-6  # inputs that are nearly always zero: their weights matter least...
    W[:, quiet] *= 10  # ...even though they are the largest in magnitude (magnitude pruning would keep them)
    keep = sparsity.wanda_keep(sparsity.Sparsity("mask", 0.5), W, x_sq)
    assert not keep[:, quiet].any() and keep.sum() == n * k // 2
    # 2:4: in each quad the two least important go
    keep = sparsity.wanda_keep(sparsity.Sparsity("2:4", 0.5), W, x_sq)
    score = np.abs(W) * np.sqrt(x_sq)
    q = score.reshape(n, -1, 4)
    assert np.array_equal(keep.reshape(n, -1, 4), q >= np.sort(q, -1)[..., 2:3])


def test_sparsegpt_prunes_planted_weights_and_beats_pruning_without_update():
    rng = np.random.default_rng(1)
    n, k, tokens = 24, 64, 512
    X = (rng.standard_normal((tokens, k)) @ rng.standard_normal((k, k)) * 0.3).astype(np.float32)
    quiet = rng.permutation(k)[:16]
    X[:, quiet] *= 1e-4
    W = rng.standard_normal((n, k)).astype(np.float32)
    H = X.T.astype(np.float64) @ X / tokens
    sp = sparsity.Sparsity("mask", 0.5)
    f = HessianFactor(H, act_order=False)  # as the converter runs SparseGPT
    parts, deq = gptq_quantize(W, f, 8, 32, symmetric=True, prune=sparsity.sparsegpt_selector(sp))
    assert np.array_equal(deq, quant.dequantize(parts, W.shape, 8, 32))  # returned = stored
    assert (deq[:, quiet] == 0).mean() > 0.95  # weights on near-silent inputs go first
    assert 0.5 <= (deq == 0).mean() <= 0.55
    # the pruned weights' error flows into the kept ones: a better layer output than Wanda + RTN
    wanda = W * sparsity.wanda_keep(sp, W, (X.astype(np.float64) ** 2).mean(0))
    rtn = quant.dequantize(quant.quantize_rtn(wanda, 8, 32, True), W.shape, 8, 32)
    err = lambda Q: float(np.linalg.norm(X @ (W - Q).T))  # noqa: E731
    assert err(deq) < 0.8 * err(rtn), (err(deq), err(rtn))
    # 2:4 inside GPTQ, even with activation order: quads are in K order, not in the permuted one
    _, deq24 = gptq_quantize(W, HessianFactor(H, act_order=True), 4, 32, symmetric=False,
                             prune=sparsity.sparsegpt_selector(sparsity.Sparsity("2:4", 0.5)))
    assert ((deq24.reshape(n, -1, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize("extra, expect", [
    (["--bits", "4", "--sparsity", "3:4"], "--sparsity 3:4 is not supported; use a fraction"),
    (["--bits", "4", "--sparsity", "1.2"], "--sparsity 1.2 is out of range"),
    (["--bits", "4", "--sparsity", "0"], "--sparsity 0 is out of range"),
    (["--bits", "4", "--sparsity", "half"], "is not a sparsity"),
    (["--sparsity", "0.5"], "--sparsity needs --bits"),
    (["--target-bpw", "3", "--sparsity", "2:4"], "--sparsity needs --bits"),
])
def test_bad_sparsity_options_fail_cleanly(extra, expect, tiny, tmp_path, capsys):
    from llmpack.cli import main

    ckpt = tiny(4).parent / "ckpt"
    out = tmp_path / "out.llmpack"
    code = main(["convert", str(ckpt), "-o", str(out), "-q"] + extra)
    err = capsys.readouterr().err
    assert code != 0 and expect in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.llmpack*"))
