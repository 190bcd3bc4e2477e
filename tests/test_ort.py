"""The onnxruntime backend against the numpy reference backend, on every family's tiny model.

f32/f16/bf16/q8 packs come from the converter; q4/q3/q2 (symmetric and with zero points) and
hand-pruned packs (layers with fewer heads / MLP neurons than the others) are written with
PackWriter (tests/pack_edit.py). accuracy_level=0 (float activations) must reproduce the numpy
backend to float rounding; the default (int8 activations) is held to top-1 agreement.
"""
import subprocess
import sys

import numpy as np
import pytest

from pack_edit import prune, requantize
from tiny_models import FAMILIES, make_tiny

pytest.importorskip("onnxruntime")

PROMPT = np.random.default_rng(1).integers(0, 290, 40)
TOL = 1e-4  # relative to the logits' scale; measured ~1e-6 (the issue asks for <= 1e-3)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """family -> {dtype: pack path}, converted once for the whole module."""
    from llmpack.converter import convert

    root = tmp_path_factory.mktemp("ort_packs")
    made = {}

    def get(family, dtype="f32"):
        key = (family, dtype)
        if key not in made:
            ckpt = root / family
            if not (ckpt / "config.json").exists():
                make_tiny(family, ckpt)
            out = root / f"{family}-{dtype}.llmpack"
            if dtype in ("f32", "f16", "bf16", "q8"):
                convert(ckpt, out, dtype=dtype, quiet=True)
            else:  # "q4s", "q4a", "q3a", "q2a": re-quantized from f32 (s = symmetric, a = zero points)
                requantize(get(family), out, int(dtype[1]), 32, symmetric=dtype[2] == "s")
            made[key] = out
        return made[key]

    return get


def backends(path, **ort_options):
    from llmpack.runtime import load

    return load(path, backend="numpy"), load(path, backend="onnxruntime", **ort_options)


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def greedy(model, ids, n=32):
    return list(model.generate_ids(list(ids), max_new_tokens=n, temperature=0, stop=False))


def check_exact(ref, ort, ids=PROMPT):
    """Full-sequence, KV-cache (prefill + single steps + a multi-token chunk) and last-only logits."""
    want = ref.logits(ids)
    assert rel_err(ort.logits(ids), want) <= TOL
    cache = ort.backend.new_cache()
    steps = [ort.backend.forward(ids[:20], cache)] + [ort.backend.forward([t], cache) for t in ids[20:30]]
    steps.append(ort.backend.forward(ids[30:35], cache))  # a chunk after cached tokens (chat turns)
    steps += [ort.backend.forward([t], cache) for t in ids[35:]]  # single steps again (rebound buffers)
    assert cache.length == len(ids)
    assert rel_err(np.concatenate(steps), want) <= TOL
    last = ort.backend.forward(ids, ort.backend.new_cache(), last_only=True)
    assert last.shape == (1, want.shape[1]) and rel_err(last, want[-1:]) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_matches_numpy(family, packs):
    ref, ort = backends(packs(family))
    check_exact(ref, ort)
    assert greedy(ort, PROMPT[:8]) == greedy(ref, PROMPT[:8])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8", "q4s", "q4a", "q2a"])
def test_storage_types_match_numpy(family, dtype, packs):
    """Every storage type, with float activations, equals the numpy backend's dequantized math."""
    if dtype in ("bf16", "q2a") and family not in ("llama", "gemma3_text", "gpt2"):
        pytest.skip("covered on three families (keeps the suite fast)")
    ref, ort = backends(packs(family, dtype), accuracy_level=0)
    check_exact(ref, ort)


def test_q3_runs_widened_to_q4(packs, tmp_path):
    from llmpack.formats import quant

    if not hasattr(quant, "widen_q3_to_q4"):
        pytest.skip("q3 storage type not in this tree yet")
    for sym in (True, False):
        path = requantize(packs("qwen2"), tmp_path / f"q3{sym}.llmpack", 3, 32, symmetric=sym)
        check_exact(*backends(path, accuracy_level=0))


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_default_accuracy_level_agrees(family, packs):
    """int8 activations (the default): top-1 agreement along the numpy backend's greedy
    continuation (teacher-forced, so one early flip does not decide the score): >= 95 % where
    the reference is decisive; random tiny models also have near-ties (margins ~1e-3), which
    int8 rounding may flip, so >= 90 % overall. The real model is held to 95 % overall."""
    ref, ort = backends(packs(family, "q4s"))
    assert ort.backend.accuracy_level == 4
    prompt = list(PROMPT[:8])
    cont = np.array(greedy(ref, prompt))
    want = ref.logits(list(prompt) + list(cont))[len(prompt) - 1:-1]
    got = ort.logits(list(prompt) + list(cont))[len(prompt) - 1:-1].argmax(-1)
    top2 = np.sort(want, -1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 0.05 * np.abs(want).max()
    assert np.mean(got == cont) >= 0.9
    assert np.mean(got[decisive] == cont[decisive]) >= 0.95


PRUNE = {  # tiny models have 4 query heads (llama/gemma: 2 KV heads) and 72 MLP neurons
    "gqa": {1: {"q": [2, 3], "kv": [1], "ffn": list(range(5, 45))},  # 2 heads on 1 KV head, 40 neurons
            2: {"q": [0, 2], "kv": [0, 1], "ffn": list(range(0, 72, 3))}},  # no grouping, 24 neurons
    "mha": {1: {"q": [0, 3], "kv": [0, 3], "ffn": list(range(5, 45))},
            2: {"q": [1], "kv": [1], "ffn": list(range(0, 72, 3))}},
}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi", "gpt2"])
def test_pruned_layers(family, packs, tmp_path):
    """Layers with their own head counts and MLP widths build and match (f32 and q4 zero points,
    whose K = 40 / 24 is not a whole number of 32-groups)."""
    plan = PRUNE["gqa" if family in ("llama", "gemma3_text") else "mha"]
    path = prune(packs(family), tmp_path / "pruned.llmpack", plan)
    ref, ort = backends(path, accuracy_level=0)
    shapes = [(ly.n_heads, ly.n_kv) for ly in ort.backend.layer_shapes]
    assert shapes[1] == (2, len(plan[1]["kv"])) and shapes[1] != shapes[0]
    check_exact(ref, ort)
    q4 = requantize(path, tmp_path / "pruned-q4.llmpack", 4, 32, symmetric=False)
    check_exact(*backends(q4, accuracy_level=0))


def test_cache_grows_and_truncates(packs, monkeypatch):
    from llmpack.runtime import ort_backend

    monkeypatch.setattr(ort_backend, "INITIAL_CAPACITY", 4)
    ref, ort = backends(packs("mistral"))  # sliding window 12 < 40 tokens
    want = ref.logits(PROMPT)
    cache = ort.backend.new_cache()
    out = [ort.backend.forward(PROMPT[:3], cache)] + [ort.backend.forward([t], cache) for t in PROMPT[3:]]
    assert cache.capacity == 64 and rel_err(np.concatenate(out), want) <= TOL
    cache.truncate(25)  # chat re-uses a common prefix: later positions are overwritten
    assert rel_err(ort.backend.forward(PROMPT[25:], cache), want[25:]) <= TOL
    assert ort_backend.next_capacity(300, 0, 160) == 300  # never below what is needed
    assert ort_backend.next_capacity(100, 64, 160) == 128


def test_context_limit_and_defaults(packs):
    from llmpack.runtime import load
    from llmpack.runtime.model import default_backend
    from llmpack.runtime.ort_backend import physical_cores

    assert default_backend() == "onnxruntime"
    m = load(packs("qwen2"), threads=1)
    assert m.backend.name == "onnxruntime" and m.backend.threads == 1
    assert load(packs("qwen2")).backend.threads == physical_cores() >= 1
    with pytest.raises(ValueError, match="context"):
        m.backend.forward(np.zeros(m.context_length + 1, np.int64), m.backend.new_cache())
    with pytest.raises(ValueError, match="unknown backend"):
        load(packs("qwen2"), backend="tensorflow")


def test_weights_are_mapped_not_copied(packs):
    """Every initializer handed to onnxruntime views the pack's mapped bytes, except what
    llmpack computes itself (RoPE cos/sin tables)."""
    ref, ort = backends(packs("qwen2", "q4a"))
    buf = ort.pack._buf
    lo, hi = buf.ctypes.data, buf.ctypes.data + buf.nbytes
    for name, (arr, _) in ort.backend.graph.weights.items():
        inside = lo <= arr.ctypes.data < hi
        assert inside == (not name.startswith("rope.")), name


def test_cli_backend_and_threads(packs):
    path = str(packs("qwen2"))
    outs = []
    for extra in (["--backend", "numpy"], ["--backend", "onnxruntime", "--threads", "1"], []):
        r = subprocess.run([sys.executable, "-m", "llmpack", "generate", path, "-p", "hello world", "-n", "12",
                            "--temperature", "0"] + extra, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] == outs[2]
    r = subprocess.run([sys.executable, "-m", "llmpack", "generate", path, "-p", "x", "--threads", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--threads" in r.stderr


def test_onnx_proto_parses(packs):
    """The hand-written protobuf (runtime/onnx_proto.py) parses with the onnx package as meant
    (test_export_onnx runs onnx.checker on an exported folder)."""
    onnx = pytest.importorskip("onnx")
    from llmpack.formats.reader import Pack
    from llmpack.runtime.onnx_graph import build_decoder

    g = build_decoder(Pack(packs("gemma3_text", "q8")), genai_io=True)
    model = onnx.load_from_string(g.model(lambda name, arr: {"location": "x.data", "offset": 7,
                                                              "length": arr.nbytes}))
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert model.graph.output[0].name == "logits"
    assert {n.op_type for n in model.graph.node} >= {"GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized",
                                                      "SkipSimplifiedLayerNormalization", "RMSNormalization"}
    init = {t.name: t for t in model.graph.initializer}
    emb = init["embed.weight/data2d"]
    assert list(emb.dims) == list(g.weights["embed.weight/data2d"][0].shape) and emb.data_location == 1
    assert {e.key: e.value for e in emb.external_data} == {"location": "x.data", "offset": "7",
                                                           "length": str(g.weights["embed.weight/data2d"][0].nbytes)}
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2 and attrs["local_window_size"] == 10
    assert abs(attrs["scale"] - 0.0625) < 1e-7


QWEN = "qwen2.5-coder-0.5b-instruct"
REAL_PROMPTS = ["def quicksort(arr):", "The three primary colors are"]


def _real_q4():
    """Real Qwen q4: the converter's own q4 when it has one, else RTN g32 re-quantized from f32."""
    from real_models import cache_dir, real_pack

    from llmpack.converter.convert import DTYPES

    if "q4" in DTYPES:
        return real_pack(QWEN, "q4")
    out = cache_dir() / "packs" / f"{QWEN}-q4-rtn-g32.llmpack"
    if not out.exists():
        requantize(real_pack(QWEN, "f32"), out, 4, 32, symmetric=True)
    return out


@pytest.mark.slow
def test_real_qwen_f32_q8_q4():
    """Real Qwen2.5-Coder-0.5B: f32 logits and greedy tokens equal the numpy backend's; q8 and q4
    with int8 activations (the default accuracy level) agree on >= 95 % of greedy tokens
    (teacher-forced along the numpy backend's continuation)."""
    from real_models import real_pack

    from llmpack.runtime import load

    for path, exact in ((real_pack(QWEN, "f32"), True), (real_pack(QWEN, "q8"), False), (_real_q4(), False)):
        ref, ort = load(path, backend="numpy"), load(path, backend="onnxruntime")
        agree = []
        for prompt in REAL_PROMPTS:
            ids = ref.tokenizer.encode(prompt)
            cont = greedy(ref, ids)
            if exact:
                want = ref.logits(ids + cont)
                assert rel_err(ort.logits(ids + cont), want) <= 1e-4
                assert greedy(ort, ids) == cont
            else:
                agree += list(ort.logits(ids + cont)[len(ids) - 1:-1].argmax(-1) == np.array(cont))
        assert exact or np.mean(agree) >= 0.95, (path, np.mean(agree))
        del ref, ort


def _with_model(raw: bytes, fn) -> bytes:
    """The same pack bytes with fn applied to the header's model description."""
    import json
    import struct

    hoff, hlen = struct.unpack_from("<QQ", raw, 16)
    header = json.loads(raw[hoff:hoff + hlen])
    fn(header["model"])
    blob = json.dumps(header).encode()
    out = bytearray(raw[:hoff] + blob)
    struct.pack_into("<Q", out, 24, len(blob))
    return bytes(out)


def test_malformed_model_description_is_a_format_error(packs, tmp_path):
    """As tests/test_errors.py does for the numpy backend: junk in any model-description field
    is rejected at load with an LlmpackError (or, if harmless, runs), never another exception."""
    from llmpack.formats import LlmpackError, Pack
    from llmpack.runtime.ort_backend import OrtBackend

    raw = packs("gemma3_text", "q8").read_bytes()
    model = json_model = None
    import json
    import struct

    hoff, hlen = struct.unpack_from("<QQ", raw, 16)
    json_model = json.loads(raw[hoff:hoff + hlen])["model"]
    targets = [(k,) for k in json_model] + [("layers", 0, k) for k in json_model["layers"][0]] + [("layers", 1)]
    path = tmp_path / "m.llmpack"
    rejected = 0
    for target in targets:
        for junk in [None, "x", -1, 10 ** 12, 1.5, float("nan"), True, [1, 2]]:
            def put(m, target=target, junk=junk):
                for key in target[:-1]:
                    m = m[key]
                m[target[-1]] = junk
            path.write_bytes(_with_model(raw, put))
            try:
                backend = OrtBackend(Pack(path, verify=False), threads=1)
                cache = backend.new_cache()
                backend.forward([1, 2, 3], cache)
                backend.forward([4], cache, last_only=True)
                del backend, model
            except (LlmpackError, ValueError) as e:  # ValueError: a context too small for the tokens
                assert "\n" not in str(e)
                rejected += 1
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"model{list(target)} = {junk!r}: {e.__class__.__name__}: {e}")
            model = None
    assert rejected > len(targets) * 8 // 2


def test_saved_session_cache(packs, tmp_path, monkeypatch):
    """cache_dir / $LLMPACK_ORT_CACHE: the first load saves onnxruntime's optimized graph with its
    pre-packed weights, the next one loads it (same logits); other options get their own entry."""
    from llmpack.formats import Pack
    from llmpack.runtime.ort_backend import OrtBackend

    path = packs("qwen2", "q4a")
    ids = list(PROMPT[:12])
    first = OrtBackend(Pack(path), cache_dir=tmp_path / "c")
    assert not first.cache_hit and len(list((tmp_path / "c").iterdir())) == 1
    monkeypatch.setenv("LLMPACK_ORT_CACHE", str(tmp_path / "c"))
    second = OrtBackend(Pack(path))
    assert second.cache_hit
    for b in (first, second):
        cache = b.new_cache()
        b.logits = np.concatenate([b.forward(ids, cache)] + [b.forward([t], cache) for t in ids[:4]])
    assert np.array_equal(first.logits, second.logits)
    assert not OrtBackend(Pack(path), accuracy_level=0).cache_hit
    assert len(list((tmp_path / "c").iterdir())) == 2
