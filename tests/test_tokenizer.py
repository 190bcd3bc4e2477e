"""The pack's tokenizer reproduces transformers' AutoTokenizer (encode and decode), for both kinds:

* tokenizer.json (kind "hf_json"): the tiny byte-level BPE of tiny_models.py, with chat specials
  and with add_bos_token in tokenizer_config.json (transformers then overrides the post-processor);
* tokenizer.model only (kind "sentencepiece"): a tiny BPE sentencepiece model trained here with
  byte_fallback, wrapped by transformers as LlamaTokenizer (prefix "▁" on the first chunk), as
  LlamaTokenizer(legacy=True) (on every chunk), as GemmaTokenizer (no dummy prefix) and as the
  generic TokenizersBackend (sentencepiece's own rules);
* the real Qwen2.5 / Gemma-3 tokenizers, fetched by tools/get_model.py (slow).

Also: StreamDecoder never emits half a UTF-8 character and its pieces add up to the full decode.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from tiny_models import tiny_tokenizer

STRINGS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文，你好世界！",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n\treturn x  +  1  # comment\n",
    "a   b\t\t c\n\n\nd  ",
    "  two leading spaces",
    " leading",
    "trailing   ",
    "\n\nnewlines first",
    "",
    "Ünïcödé façade naïve — “quotes”",
    "<s>hello</s> world<s>",
    "special inside</s>text<s> and tail </s>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "x<end_of_turn> y",
    "12345 numbers 3.14159",
    "▁literal metaspace",
    "<unk> and <pad>",
]
SP_TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny model",
           "def main():\n    return 42", "日本語 テキスト 中文 你好世界", "emoji 😀 fun", "User: hi there\nAssistant: hello!"]
REAL = {"qwen05": "qwen2.5-coder-0.5b-instruct", "gemma270m": "gemma-3-270m"}  # tools/get_model.py names


class Folder:
    """What tokenizer_files.collect needs from a Checkpoint, for a folder holding only tokenizer files."""

    def __init__(self, d):
        self.dir = Path(d)

    def json_file(self, name):
        p = self.dir / name
        return json.loads(p.read_text()) if p.is_file() else {}


def runtime_tokenizer(folder):
    from llmpack.converter import tokenizer_files
    from llmpack.runtime.tokenizer import Tokenizer

    section, _, blob = tokenizer_files.collect(Folder(folder))
    json.dumps(section)  # the section goes into the JSON header
    return Tokenizer(section, blob), section


def hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def bpe_folder(folder: Path, chat_specials=True, **config):
    """tiny_models' byte-level BPE, optionally with ChatML specials and tokenizer_config overrides."""
    from tokenizers import AddedToken

    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(folder)
    if chat_specials:
        tok = hf_tokenizer(folder)
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                       special_tokens=True)
        tok.save_pretrained(folder)
    if config:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.update(config)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def sp_folder(folder: Path, tokenizer_class="LlamaTokenizer", add_dummy_prefix=True, **config):
    """A sentencepiece BPE (byte_fallback) trained on a few lines; the folder has only tokenizer.model."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT * 30), model_prefix=str(folder / "tokenizer"), vocab_size=420,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    cfg = {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "pad_token": "<pad>", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def assert_parity(rt, hf, strings=STRINGS):
    for s in strings:
        want = hf(s).input_ids
        assert rt.encode(s) == want, f"encode {s!r}"
        assert rt.encode(s, add_special_tokens=False) == hf(s, add_special_tokens=False).input_ids, s
        for skip in (False, True):
            assert rt.decode(want, skip_special_tokens=skip) == hf.decode(want, skip_special_tokens=skip), \
                f"decode {s!r} skip_special_tokens={skip}"


# -- tokenizer.json ---------------------------------------------------------------------------
def test_bpe_json_parity(tmp_path):
    folder = bpe_folder(tmp_path / "tok")
    rt, section = runtime_tokenizer(folder)
    assert section["kind"] == "hf_json"
    assert_parity(rt, hf_tokenizer(folder))
    assert rt.is_special(rt.token_to_id("<|im_end|>"))


def test_bpe_json_bos_comes_from_the_post_processor(tmp_path):
    # transformers 5.24 ignores add_bos_token/add_eos_token in tokenizer_config.json when there is a
    # tokenizer.json (from_pretrained pops them): tokenizer.json's post-processor alone decides.
    from tokenizers import Tokenizer as HFTokenizer, processors

    folder = bpe_folder(tmp_path / "ignored", add_bos_token=True, add_eos_token=True)
    rt, _ = runtime_tokenizer(folder)
    hf = hf_tokenizer(folder)
    assert hf("hi").input_ids == rt.encode("hi") and hf.bos_token_id not in rt.encode("hi")
    assert_parity(rt, hf)

    folder = bpe_folder(tmp_path / "bos")  # a post-processor that adds BOS, as Llama-3's and Gemma's do
    raw = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    raw.save(str(folder / "tokenizer.json"))
    rt, _ = runtime_tokenizer(folder)
    hf = hf_tokenizer(folder)
    assert rt.encode("hi")[0] == bos and rt.encode("hi", add_special_tokens=False)[0] != bos
    assert_parity(rt, hf)


def test_prefers_tokenizer_json(tmp_path):
    folder = bpe_folder(tmp_path / "tok", chat_specials=False)
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    _, section = runtime_tokenizer(folder)
    assert section["kind"] == "hf_json"


# -- sentencepiece ----------------------------------------------------------------------------
SP_CASES = {
    "llama": dict(tokenizer_class="LlamaTokenizer", add_bos_token=True),  # Llama-2 style
    "llama_legacy": dict(tokenizer_class="LlamaTokenizer", legacy=True),
    "llama_no_prefix": dict(tokenizer_class="LlamaTokenizer", add_prefix_space=False),
    "gemma": dict(tokenizer_class="GemmaTokenizer", add_dummy_prefix=False, add_bos_token=True),
    "generic": dict(tokenizer_class="TokenizersBackend"),
}


@pytest.mark.parametrize("case", list(SP_CASES))
def test_sentencepiece_parity(case, tmp_path):
    folder = sp_folder(tmp_path / case, **SP_CASES[case])
    rt, section = runtime_tokenizer(folder)
    assert section["kind"] == "sentencepiece"
    hf = hf_tokenizer(folder)
    assert_parity(rt, hf)
    # the byte-fallback path is really exercised: an emoji that is not in the vocab becomes byte pieces
    assert any(rt.id_to_token(i).startswith("<0x") for i in rt.encode("🇫🇷"))
    assert rt.add_bos == bool(hf.add_bos_token)


def test_sentencepiece_add_bos_default(tmp_path):
    # transformers 5 adds BOS only when tokenizer_config.json says add_bos_token: true (4.x defaulted to
    # True for Llama); the pack records what transformers does.
    folder = sp_folder(tmp_path / "tok")
    rt, section = runtime_tokenizer(folder)
    hf = hf_tokenizer(folder)
    assert hf.add_bos_token is False and section["add_bos"] is False
    assert rt.encode("hello") == hf("hello").input_ids and rt.bos_id not in rt.encode("hello")


# -- streaming --------------------------------------------------------------------------------
STREAM_TEXTS = ["emoji 😀👍🏽 family 👨‍👩‍👧 and 🇫🇷", "日本語のテキスト 中文 你好", "naïve café ✓ — done\n\tend"]


def _stream(rt, ids, **kw):
    from llmpack.runtime.tokenizer import StreamDecoder

    dec = StreamDecoder(rt, **kw)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_stream_decoder_never_splits_characters(kind, tmp_path):
    folder = bpe_folder(tmp_path / "t") if kind == "bpe" else sp_folder(tmp_path / "t")
    rt, _ = runtime_tokenizer(folder)
    split_somewhere = False
    for text in STREAM_TEXTS:
        ids = rt.encode(text, add_special_tokens=False)
        split_somewhere |= any("\ufffd" in rt.decode([i]) for i in ids)  # a token holding half a character
        pieces = _stream(rt, ids)
        assert not any("\ufffd" in p for p in pieces), pieces
        assert "".join(pieces) == rt.decode(ids) == text
        # tokens arriving after a special token and mid-stream starts (chat replies) add up too
        tail = ids[len(ids) // 3:]
        assert "".join(_stream(rt, tail)) == rt.decode(tail)
    assert split_somewhere, "the test texts must put some character's bytes into several tokens"


def test_stream_decoder_incomplete_tail_is_flushed(tmp_path):
    rt, _ = runtime_tokenizer(bpe_folder(tmp_path / "t", chat_specials=False))
    ids = rt.encode("ok 😀", add_special_tokens=False)
    cut = ids[:-1]  # the emoji's last byte never arrives
    pieces = _stream(rt, cut)
    assert not any("\ufffd" in p for p in pieces[:-1])
    assert "".join(pieces) == rt.decode(cut)


# -- real tokenizers (prepared by tools/get_model.py) -------------------------------------------------
@functools.lru_cache(maxsize=None)
def real_tokenizers(name):
    """(runtime tokenizer, header section, transformers tokenizer) of a real model folder, loaded once."""
    from real_models import real_model

    folder = real_model(REAL[name])
    return (*runtime_tokenizer(folder), hf_tokenizer(folder))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_tokenizer_parity(name):
    rt, section, hf = real_tokenizers(name)
    assert_parity(rt, hf)
    for text in STREAM_TEXTS:
        ids = rt.encode(text, add_special_tokens=False)
        pieces = _stream(rt, ids)
        assert "".join(pieces) == rt.decode(ids) and not any("\ufffd" in p for p in pieces)

