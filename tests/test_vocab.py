"""Vocabulary trimming (`convert --vocab-size N / --vocab-from FILE`): tokenizer surgery, packs, eval.

The trimmed tokenizer round-trips any UTF-8 text (fuzzed), emits only kept ids, and tokenizes
text whose original tokens are all kept exactly as the original does (renumbered). A trimmed
pack computes the untrimmed pack's logits gathered at the kept ids, on the numpy and
onnxruntime backends and as exported ONNX; generation and decoding stay within the kept tokens.
`eval` across the two tokenizations: bits per byte for both, KLD over windows tokenized alike.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_tokenizer import bpe_folder, hf_tokenizer, runtime_tokenizer, sp_folder
from tiny_models import make_tiny
from refusals import assert_convert_refuses

torch = pytest.importorskip("torch")

from llmpack.converter import convert, tokenizer_trim  # noqa: E402
from llmpack.formats import LlmpackError, Pack  # noqa: E402
from llmpack.runtime import load  # noqa: E402
from llmpack.runtime.tokenizer import Tokenizer  # noqa: E402

CORPUS = "the quick brown fox jumps over the lazy dog. hello world, this is a tiny model\n" * 3
TEXT = "def main():\n    return the quick 42 über 😀 <|im_start|>user\nhi<|im_end|>\n"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def trimmed_tok(tmp_path_factory):
    """(original Tokenizer, trimmed Tokenizer, plan): the tiny byte-level BPE with ChatML specials,
    trimmed to its protected set plus 12 tokens counted on CORPUS."""
    folder = bpe_folder(tmp_path_factory.mktemp("tok"))
    orig, section = runtime_tokenizer(folder)
    blob = orig._tok.to_str().encode()
    rows = orig.vocab_size
    protected = len(tokenizer_trim.protected_ids(tokenizer_trim.BpeTokenizerJson(blob), section, {}, rows))
    plan = tokenizer_trim.plan((section, "tokenizer/tokenizer.json", blob), {}, {}, rows, protected + 12,
                               [CORPUS], "corpus")
    return orig, Tokenizer(section, plan.blob), plan


def test_protected_set_and_merges(trimmed_tok):
    orig, trim, plan = trimmed_tok
    assert len(plan.kept) == plan.protected + 12 == trim.vocab_size
    kept_tokens = {orig.id_to_token(int(i)) for i in plan.kept}
    alphabet = set(tokenizer_trim.byte_alphabet())
    assert alphabet <= kept_tokens and {"<s>", "</s>", "<|im_start|>", "<|im_end|>"} <= kept_tokens
    counts = {}
    for i in orig.encode(CORPUS):
        if len(orig.id_to_token(i)) > 1:  # merged tokens (single symbols are the protected alphabet)
            counts[i] = counts.get(i, 0) + 1
    top = sorted(counts, key=lambda i: -counts[i])
    assert orig.id_to_token(top[0]) in kept_tokens and orig.id_to_token(top[-1]) not in kept_tokens
    doc = json.loads(plan.blob)
    for a, b in doc["model"]["merges"]:  # closed: every kept merge's parts and result are kept
        assert {a, b, a + b} <= kept_tokens
    assert sorted(doc["model"]["vocab"].values()) == list(range(len(doc["model"]["vocab"])))
    assert trim.token_to_id("<|im_end|>") == int(plan.new_of_old[orig.token_to_id("<|im_end|>")])


@FUZZ
@given(text=st.text(max_size=60))
def test_trimmed_tokenizer_round_trips_any_text(trimmed_tok, text):
    orig, trim, plan = trimmed_tok
    ids = trim.encode(text)
    assert all(0 <= i < len(plan.kept) for i in ids)  # only kept ids: the trimmed rows do not exist
    assert trim.decode(ids, skip_special_tokens=False) == orig.decode(orig.encode(text), skip_special_tokens=False)
    assert trim.decode(ids, skip_special_tokens=False) == text


@FUZZ
@given(picks=st.lists(st.integers(0, 10**6), max_size=12))
def test_text_of_kept_tokens_tokenizes_as_the_original(trimmed_tok, picks):
    orig, trim, plan = trimmed_tok
    text = "".join(orig.decode([int(plan.kept[p % len(plan.kept)])], skip_special_tokens=False) for p in picks)
    want = orig.encode(text)
    if all(plan.new_of_old[i] >= 0 for i in want):
        assert trim.encode(text) == [int(plan.new_of_old[i]) for i in want]


@pytest.fixture(scope="module")
def trimmed_fallback(tmp_path_factory):
    """A sentencepiece-style BPE with byte fallback, as tokenizer.json (transformers' conversion of
    test_tokenizer's tiny sentencepiece model), trimmed to its protected set plus 20 tokens."""
    root = tmp_path_factory.mktemp("sp")
    hf_tokenizer(sp_folder(root / "sp")).save_pretrained(root / "json")
    (root / "json" / "tokenizer.model").unlink(missing_ok=True)
    orig, section = runtime_tokenizer(root / "json")
    assert section["kind"] == "hf_json"
    blob = orig._tok.to_str().encode()
    bpe = tokenizer_trim.BpeTokenizerJson(blob)
    assert bpe.model["byte_fallback"]
    protected = tokenizer_trim.protected_ids(bpe, section, {}, orig.vocab_size)
    assert {bpe.vocab[f"<0x{b:02X}>"] for b in range(256)} <= protected
    plan = tokenizer_trim.plan((section, "t", blob), {}, {}, orig.vocab_size, len(protected) + 20, [CORPUS], "c")
    return orig, Tokenizer(section, plan.blob), plan


@FUZZ
@given(text=st.text(max_size=60))
def test_byte_fallback_tokenizer_round_trips_any_text(trimmed_fallback, text):
    orig, trim, plan = trimmed_fallback
    ids = trim.encode(text)
    assert all(0 <= i < len(plan.kept) for i in ids) and trim.vocab_size < orig.vocab_size
    assert trim.decode(ids, skip_special_tokens=False) == orig.decode(orig.encode(text), skip_special_tokens=False)


def test_corpus_tokenizes_as_the_original(trimmed_tok):
    """--vocab-from alone keeps every token the corpus uses: the corpus then tokenizes identically."""
    orig, _, _ = trimmed_tok
    blob = orig._tok.to_str().encode()
    section = {"kind": "hf_json", "blob": "t", "special": {}}
    corpus = "hello world, the lazy dog\n" + TEXT
    plan = tokenizer_trim.plan((section, "t", blob), {}, {}, orig.vocab_size, None, [corpus], "c")
    trim = Tokenizer(section, plan.blob)
    want = orig.encode(corpus)
    assert trim.vocab_size < orig.vocab_size - 5
    assert trim.encode(corpus) == [int(plan.new_of_old[i]) for i in want]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """family -> (full f32 pack, trimmed f32 pack to 275 of 300 rows, kept old ids)."""
    root = tmp_path_factory.mktemp("vocab")
    made = {}

    def get(family):
        if family not in made:
            ckpt = root / family
            make_tiny(family, ckpt)
            full, trim = root / f"{family}-full.llmpack", root / f"{family}-trim.llmpack"
            convert(ckpt, full, dtype="f32", quiet=True)
            convert(ckpt, trim, dtype="f32", vocab_size=275, quiet=True)
            made[family] = (ckpt, full, trim, kept_ids(full, trim))
        return made[family]
    return get


def kept_ids(full, trim) -> np.ndarray:
    a, b = load(full, backend="numpy").tokenizer, load(trim, backend="numpy").tokenizer
    return np.array([a.token_to_id(b.id_to_token(i)) for i in range(b.vocab_size)])


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", ["qwen2", "llama", "phi"])  # tied head; untied head; head bias
def test_trimmed_logits_are_the_original_logits_at_kept_ids(family, packs, tmp_path):
    from llmpack.runtime.cmd_export_onnx import export_onnx
    from test_export_onnx import BareDecoder

    _, full, trim, kept = packs(family)
    ids = load(trim, backend="numpy").tokenizer.encode(TEXT)
    for backend, options in (("numpy", {}), ("onnxruntime", {"accuracy_level": 0})):
        want = load(full, backend=backend, **options).logits(kept[ids])[:, kept]
        got = load(trim, backend=backend, **options).logits(ids)
        assert got.shape == (len(ids), 275) and rel(got, want) <= 1e-5, backend
    export_onnx(trim, tmp_path / "onnx", accuracy_level=0)
    got = BareDecoder(tmp_path / "onnx")(ids)
    assert rel(got, want) <= 1e-4
    assert json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]["vocab_size"] == 275
    header = Pack(trim).header
    assert header["recipe"][0]["step"] == "vocab" and header["recipe"][0]["size"] == 275
    assert header["config"]["vocab_size"] == 275


def test_q4_rtn_trim_equals_gathered_q4_and_generation_stays_in_vocab(packs, tmp_path):
    """RTN quantizes the embedding and head row by row, so trimming then quantizing stores the same
    rows as quantizing the full model: the logits agree at the kept ids."""
    ckpt, _, _, kept = packs("llama")
    full, trim = tmp_path / "f.llmpack", tmp_path / "t.llmpack"
    convert(ckpt, full, bits=4, quiet=True)
    convert(ckpt, trim, bits=4, vocab_size=275, quiet=True)
    m = load(trim, backend="numpy")
    ids = m.tokenizer.encode(TEXT)
    assert rel(m.logits(ids), load(full, backend="numpy").logits(kept[ids])[:, kept]) <= 1e-5
    out = list(m.generate_ids(ids, max_new_tokens=24, temperature=1.0, seed=3, stop=False))
    assert len(out) == 24 and all(0 <= t < 275 for t in out)
    original = load(full, backend="numpy").tokenizer
    assert m.tokenizer.decode(out, skip_special_tokens=False) == original.decode(kept[out], skip_special_tokens=False)


def test_calibrated_steps_compose_with_trimming(packs, tmp_path):
    """GPTQ and slicing calibrate on the trimmed tokenization (tied qwen2: slicing unties the head)."""
    ckpt, _, _, _ = packs("qwen2")
    out = tmp_path / "s.llmpack"
    convert(ckpt, out, bits=4, method="gptq", slice=0.25, vocab_size=280, calib_samples=4, calib_seqlen=32,
            quiet=True)
    p = Pack(out)
    assert [r["step"] for r in p.header["recipe"]] == ["vocab", "slice", "quantize"]
    assert p.tensors["embed.weight"]["shape"][0] == 280 and p.tensors["head.weight"]["shape"][0] == 280
    m = load(out, backend="onnxruntime")
    assert m.logits(m.tokenizer.encode(TEXT)).shape[1] == 280


def test_eval_across_tokenizers(packs):
    """Trimmed f32 against the full f32: where both tokenize a window alike the file's distribution
    is the reference's renormalized over the kept tokens (KLD 0); bits per byte for both."""
    from llmpack.converter.quantize.calib import default_eval_path
    from llmpack.runtime.quality import evaluate_files

    _, full, trim, _ = packs("llama")
    same = evaluate_files(full, full, default_eval_path(), windows=3, ctx=48, quiet=True)
    assert same["kld"] == 0 and same["bpb_ratio"] == 1 and same["bpb"] > 0
    r = evaluate_files(trim, full, default_eval_path(), windows=6, ctx=48, quiet=True)
    assert r["tokenization"] == "own" and r["windows"] == 6
    assert 0 < r["identical_windows"] < 1 and 0 < r["compared_positions"] < 1 and r["kld"] < 1e-9
    assert 0 < r["ref_mass_removed"] < 1 and r["bpb"] > 0 and r["bpb_ratio"] == r["bpb"] / r["bpb_ref"]
    shown = subprocess.run([sys.executable, "-m", "llmpack", "eval", str(trim), "--reference", str(full), "--text",
                            str(default_eval_path()), "--windows", "4", "--ctx", "48", "-q"],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "bits/byte   file" in shown.stdout and "tokenized alike" in shown.stdout


def test_convert_eval_of_a_trimmed_pack_is_recorded_and_shown(packs, tmp_path):
    from llmpack.converter.quantize.calib import default_eval_path

    ckpt, _, _, _ = packs("llama")
    out = tmp_path / "e.llmpack"
    convert(ckpt, out, dtype="f32", vocab_size=275, eval_text=str(default_eval_path()), eval_windows=3, eval_ctx=48,
            quiet=True)
    q = Pack(out).header["quality"][0]
    assert q["tokenization"] == "own" and q["kld"] < 1e-9 and q["bpb"] > 0
    shown = subprocess.run([sys.executable, "-m", "llmpack", "inspect", str(out)], capture_output=True, text=True)
    assert "quality     bits/byte" in shown.stdout and "of positions read alike" in shown.stdout, shown.stdout
    assert "recipe      vocab (size 275, removed 25" in shown.stdout, shown.stdout


@pytest.mark.parametrize("args,message", [
    (["--vocab-size", "0"], "--vocab-size 0: give the number of tokens to keep"),
    (["--vocab-size", "100"], "the smallest allowed --vocab-size is 258"),
    (["--vocab-size", "300"], "--vocab-size 300: the model has 300 tokens"),
    (["--vocab-from", "/nonexistent.txt"], "--vocab-from /nonexistent.txt: no such file"),
    (["--vocab-size", "280", "--target-bpw", "4"], "--target-bpw measures the untrimmed vocabulary"),
    (["--vocab-size", "280", "--target-size", "1MB", "--keep-vocab"], "--keep-vocab tells --target-size"),
    (["--keep-vocab", "--bits", "4"], "--keep-vocab tells --target-size/--plan-only not to trim"),
])
def test_bad_vocab_options_are_one_line_errors(args, message, packs, tmp_path):
    assert_convert_refuses(packs("llama")[0], tmp_path, args, message)


def test_sentencepiece_only_tokenizer_is_refused():
    with pytest.raises(LlmpackError, match="needs a tokenizer.json"):
        tokenizer_trim.plan(({"kind": "sentencepiece"}, "t", b""), {}, {}, 300, 280, [""], "c")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen05", "gemma270m"])  # byte-level BPE; byte-fallback BPE (262k)
def test_real_tokenizer_trimmed_to_32k(name):
    from llmpack.converter.quantize.calib import default_text
    from test_tokenizer import STRINGS, real_tokenizers

    orig, section, _ = real_tokenizers(name)
    blob = orig._tok.to_str().encode()
    plan = tokenizer_trim.plan((section, "t", blob), {}, {}, orig.vocab_size, 32768, [default_text()], "c")
    trim = Tokenizer(section, plan.blob)
    assert trim.vocab_size == 32768
    for text in STRINGS + ["naïve façade — “quotes” 日本語 😀 \u200b\x00\x7f"]:
        ids = trim.encode(text)
        assert all(0 <= i < 32768 for i in ids)
        assert trim.decode(ids, skip_special_tokens=False) == orig.decode(orig.encode(text), skip_special_tokens=False)
    for t in ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"):  # the chat markers stay single
        if orig.token_to_id(t) is not None:
            assert trim.encode(t, add_special_tokens=False) == [int(plan.new_of_old[orig.token_to_id(t)])]
    text = default_text()[:20000]  # the counting corpus uses only kept tokens: it tokenizes identically
    assert trim.encode(text) == [int(plan.new_of_old[i]) for i in orig.encode(text)]
