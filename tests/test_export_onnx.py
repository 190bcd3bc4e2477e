"""`llmpack export-onnx`: the exported folder runs with bare onnxruntime (no llmpack code in the
loop) and with onnxruntime-genai, and matches the numpy backend."""
import json
import os

import numpy as np
import pytest

from pack_edit import requantize
from tiny_models import make_tiny

ort = pytest.importorskip("onnxruntime")

PROMPT = [int(t) for t in np.random.default_rng(1).integers(2, 290, 40)]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# qwen2: RoPE inside GroupQueryAttention; gemma3: standard-op RoPE (head_dim 24), sliding window,
# q/k norms, sandwich norms; gpt2: learned positions, LayerNorm, biases.
CASES = [("qwen2", "q4a"), ("gemma3_text", "q8"), ("gpt2", "f16")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, dtype) -> (pack path, export dir at accuracy_level 0, export result)."""
    from llmpack.converter import convert
    from llmpack.runtime.cmd_export_onnx import export_onnx

    root = tmp_path_factory.mktemp("export")
    made = {}

    def get(family, dtype):
        if (family, dtype) not in made:
            ckpt = root / family
            if not ckpt.exists():
                make_tiny(family, ckpt)
                (ckpt / "chat_template.jinja").write_text(TEMPLATE)
            pack = root / f"{family}-{dtype}.llmpack"
            if dtype.startswith("q4"):
                convert(ckpt, root / f"{family}-f32.llmpack", dtype="f32", quiet=True)
                requantize(root / f"{family}-f32.llmpack", pack, 4, 32, symmetric=False)
            else:
                convert(ckpt, pack, dtype=dtype, quiet=True)
            out = root / f"{family}-{dtype}-onnx"
            made[(family, dtype)] = (pack, out, export_onnx(pack, out, accuracy_level=0))
        return made[(family, dtype)]

    return get


def numpy_model(pack):
    from llmpack.runtime import load

    return load(pack, backend="numpy")


class BareDecoder:
    """The exported model driven with plain onnxruntime calls, as any ONNX user would."""

    def __init__(self, folder, capacity=None):
        self.sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.layers = sum(1 for n in self.inputs if n.endswith(".key"))
        self.capacity = capacity  # None: past grows each step; N: one shared buffer of N positions
        self.length = 0
        self.past = []
        for i in range(self.layers):
            _, kv, _, hd = self.inputs[f"past_key_values.{i}.key"].shape
            shape = (1, kv, capacity or 0, hd)
            self.past.append([np.zeros(shape, np.float32), np.zeros(shape, np.float32)])

    def __call__(self, ids):
        T, start = len(ids), self.length
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, start + T), np.int64),
                "position_ids": np.arange(start, start + T, dtype=np.int64)[None]}
        for i, (k, v) in enumerate(self.past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        names = [o.name for o in self.sess.get_outputs()]
        out = dict(zip(names, self.sess.run(names, feed)))
        self.past = [[out[f"present.{i}.key"], out[f"present.{i}.value"]] for i in range(self.layers)]
        if self.capacity:
            assert self.past[0][0].shape[2] == self.capacity  # present shares the past buffer's shape
        self.length += T
        return out["logits"][0]


@pytest.mark.parametrize("family,dtype", CASES)
def test_bare_onnxruntime_matches_numpy(family, dtype, exported):
    pack, folder, _ = exported(family, dtype)
    want = numpy_model(pack).logits(PROMPT)
    scale = np.abs(want).max()
    assert np.abs(BareDecoder(folder)(PROMPT) - want).max() <= 1e-4 * scale
    for capacity in (None, 64):
        dec = BareDecoder(folder, capacity)
        steps = [dec(PROMPT[:20])] + [dec([t]) for t in PROMPT[20:]]
        assert np.abs(np.concatenate(steps) - want).max() <= 1e-4 * scale


def test_folder_contents_and_genai_config(exported):
    onnx = pytest.importorskip("onnx")
    pack, folder, res = exported("qwen2", "q4a")
    assert set(res["files"]) == {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                                 "tokenizer_config.json", "chat_template.jinja"}
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["filename"] == "model.onnx"
    assert (dec["head_size"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["num_hidden_layers"]) == \
        (16, 4, 2, 3)
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                             "past_value_names": "past_key_values.%d.value"}
    assert dec["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                              "present_value_names": "present.%d.value"}
    assert cfg["model"]["type"] == "qwen2" and cfg["model"]["vocab_size"] == 300
    assert cfg["search"]["past_present_share_buffer"] is True
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TEMPLATE == (folder / "chat_template.jinja").read_text()
    # q4 stays 4-bit: the weights hold about the pack's bytes (not an f32 expansion), page-aligned
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    lengths = [int({e.key: e.value for e in t.external_data}["length"]) for t in model.graph.initializer
               if t.data_location == 1]
    assert sum(lengths) < 1.3 * pack.stat().st_size
    assert (folder / "model.onnx.data").stat().st_size < sum(lengths) + 4096 * len(lengths)


def test_cli_export(exported, tmp_path):
    from llmpack.cli import main

    pack, _, _ = exported("gpt2", "f16")
    assert main(["export-onnx", str(pack), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "genai_config.json").is_file()
    (tmp_path / "file").write_text("")
    assert main(["export-onnx", str(pack), "-o", str(tmp_path / "file")]) == 2


def test_export_is_never_half_written(exported, tmp_path):
    """A new folder appears whole; re-exporting into a used folder replaces its files; a folder
    that cannot be written is a one-line error; no temporary folder is left behind."""
    from llmpack.formats.errors import LlmpackError
    from llmpack.runtime.cmd_export_onnx import export_onnx

    pack, first, _ = exported("gpt2", "f16")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = export_onnx(pack, out, accuracy_level=0)
    assert sorted(p.name for p in out.iterdir()) == sorted(res["files"] + ["notes.txt"])
    assert (out / "model.onnx.data").read_bytes() == (first / "model.onnx.data").read_bytes()
    fresh = export_onnx(pack, tmp_path / "fresh", accuracy_level=0)
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == sorted(fresh["files"])
    (tmp_path / "plain").mkdir()  # the mode any new folder gets here (umask), not mkdtemp's 0700
    assert (tmp_path / "fresh").stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out", "plain"]
    if os.path.isdir("/proc/self"):
        with pytest.raises(LlmpackError, match="cannot write in /proc"):
            export_onnx(pack, "/proc/llmpack-onnx")


@pytest.mark.parametrize("family,dtype", CASES)
def test_onnxruntime_genai_generates_the_same(family, dtype, exported):
    og = pytest.importorskip("onnxruntime_genai")
    pack, folder, _ = exported(family, dtype)
    prompt = PROMPT[:12]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 32, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    want = list(numpy_model(pack).generate_ids(prompt, max_new_tokens=32, temperature=0, stop=False))
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert got and got == want[:len(got)]
    assert len(got) == 32 or got[-1] in eos  # genai stops early only on an end-of-sequence id


def test_pruned_export_runs_with_bare_onnxruntime(exported, tmp_path):
    """Layers with their own head counts export too (onnxruntime-genai cannot size such a cache,
    so genai_config says so; bare onnxruntime runs it)."""
    from llmpack.runtime.cmd_export_onnx import export_onnx
    from pack_edit import prune

    pack, _, _ = exported("qwen2", "q4a")
    pruned = prune(pack.parent / "qwen2-f32.llmpack", tmp_path / "pruned.llmpack",
                   {1: {"q": [2, 3], "kv": [1], "ffn": list(range(40))}})
    export_onnx(pruned, tmp_path / "onnx", accuracy_level=0)
    assert "llmpack_note" in json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]["decoder"]
    want = numpy_model(pruned).logits(PROMPT)
    dec = BareDecoder(tmp_path / "onnx", capacity=48)
    got = np.concatenate([dec(PROMPT[:10])] + [dec([t]) for t in PROMPT[10:]])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
def test_real_qwen_export_generates_like_the_backend(tmp_path):
    """Real Qwen2.5-Coder-0.5B q8, default accuracy level: onnxruntime-genai on the exported
    folder produces the llmpack onnxruntime backend's greedy tokens (same graph, same kernels)."""
    og = pytest.importorskip("onnxruntime_genai")
    from real_models import real_pack

    from llmpack.runtime import load
    from llmpack.runtime.cmd_export_onnx import export_onnx

    pack = real_pack("qwen2.5-coder-0.5b-instruct", "q8")
    export_onnx(pack, tmp_path / "onnx")
    model = load(pack)
    ids = model.tokenizer.encode("def quicksort(arr):")
    want = list(model.generate_ids(ids, max_new_tokens=32, temperature=0, stop=False))
    del model
    gm = og.Model(str(tmp_path / "onnx"))
    params = og.GeneratorParams(gm)
    params.set_search_options(max_length=len(ids) + 32, min_length=len(ids) + 32, do_sample=False)
    gen = og.Generator(gm, params)
    gen.append_tokens(ids)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == want
