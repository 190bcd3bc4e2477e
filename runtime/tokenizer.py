"""Tokenizers from the bytes embedded in the pack: tokenizer.json via `tokenizers`, or sentencepiece.

Both kinds reproduce `AutoTokenizer.from_pretrained(folder)` of the converting transformers:
`encode(text)` == `tok(text).input_ids` and `decode(ids, skip_special_tokens=s)` ==
`tok.decode(ids, skip_special_tokens=s)` (see converter/tokenizer_files.py for what is recorded).
"""
from __future__ import annotations

import json
import re

from llmpack.formats.errors import FormatError

PREPEND_SCHEMES = ("first", "always", "never", "spm")


class Tokenizer:
    def __init__(self, section: dict, blob: bytes):
        self.kind = section["kind"]
        self.special = {k: v for k, v in section.get("special", {}).items() if v}
        self.add_bos = section.get("add_bos", False)
        self.add_eos = section.get("add_eos", False)
        self.clean_up_spaces = section.get("clean_up_spaces", False)
        if self.kind == "hf_json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._tok = HFTokenizer.from_str(blob.decode("utf-8"))
            except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception on bad JSON
                raise FormatError(f"the embedded tokenizer.json does not load ({e}); convert the model again")
            self._tok.no_padding()
            self._tok.no_truncation()
            if section.get("split_special_tokens"):
                self._tok.encode_special_tokens = True
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        elif self.kind == "sentencepiece":
            self._init_sentencepiece(section, blob)
        else:
            raise FormatError(f"unknown tokenizer kind {self.kind!r}; upgrade llmpack")

    # -- sentencepiece ------------------------------------------------------------------------
    def _init_sentencepiece(self, section: dict, blob: bytes):
        import sentencepiece as spm

        self.prepend = section.get("prepend", "spm")
        if self.prepend not in PREPEND_SCHEMES:
            raise FormatError(f"unknown sentencepiece prepend scheme {self.prepend!r}; upgrade llmpack")
        try:
            self._sp_raw = spm.SentencePieceProcessor(model_proto=blob)
            # transformers' Llama/Gemma pipelines do not normalize and place the "▁" prefix themselves:
            # the same model with an identity normalizer and no dummy prefix, to which we prepend " ".
            self._sp = self._sp_raw if self.prepend == "spm" else spm.SentencePieceProcessor(
                model_proto=blob + _identity_normalizer_patch())
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"the embedded tokenizer.model does not load ({e}); convert the model again")
        self.vocab_size = self._sp.get_piece_size()
        added = section.get("added_tokens")
        if added is None:  # no record from transformers: control pieces and named specials are special
            added = [[i, self._sp.id_to_piece(i), True] for i in range(self.vocab_size)
                     if self._sp.is_control(i) or self._sp.is_unknown(i)]
            added += [[self._sp.piece_to_id(t), t, True] for t in self.special.values()
                      if self._sp.piece_to_id(t) != self._sp.unk_id() or t == self._sp.id_to_piece(self._sp.unk_id())]
        self._added = {int(i): str(c) for i, c, _ in added}
        self._added_ids = {c: i for i, c in self._added.items()}
        self._special_ids = {int(i) for i, _, s in added if s}
        self.vocab_size = max([self.vocab_size] + [i + 1 for i in self._added])
        words = sorted((c for c in self._added_ids if c), key=len, reverse=True)
        self._split_re = re.compile("|".join(map(re.escape, words))) if words else None
        decoder = section.get("decoder")
        self._decoder = _decoder_from_json(decoder) if decoder else None

    def _encode_sp(self, text: str) -> list[int]:
        """Split out added tokens (leftmost-longest, as tokenizers does), encode the chunks between."""
        ids, pos = [], 0
        matches = list(self._split_re.finditer(text)) if self._split_re else []
        for m in matches + [None]:
            end = m.start() if m else len(text)
            if end > pos:
                ids += self._encode_chunk(text[pos:end], first=pos == 0)
            if m:
                ids.append(self._added_ids[m.group()])
                pos = m.end()
        return ids

    def _encode_chunk(self, chunk: str, first: bool) -> list[int]:
        if self.prepend in ("always", "first") and not chunk.startswith((" ", "▁")):
            if self.prepend == "always" or first:
                chunk = " " + chunk
        return self._sp.encode(chunk)

    # -- common ---------------------------------------------------------------------------------
    def token_to_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if self.kind == "hf_json":
            return self._tok.token_to_id(text)
        if text in self._added_ids:
            return self._added_ids[text]
        i = self._sp.piece_to_id(text)
        return None if i == self._sp.unk_id() and text != self._sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        if self.kind == "hf_json":
            return self._tok.id_to_token(int(token_id))
        if token_id in self._added:
            return self._added[token_id]
        return self._sp.id_to_piece(int(token_id)) if 0 <= token_id < self._sp.get_piece_size() else None

    @property
    def bos_id(self):
        return self.token_to_id(self.special.get("bos_token"))

    @property
    def eos_id(self):
        return self.token_to_id(self.special.get("eos_token"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds BOS/EOS as transformers' `tok(text)` does."""
        if self.kind == "hf_json":
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._encode_sp(text)
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (note: transformers' decode defaults to skip_special_tokens=False)."""
        ids = [int(i) for i in ids]
        if self.kind == "hf_json":
            text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        else:
            if skip_special_tokens:
                ids = [i for i in ids if i not in self._special_ids]
            if self._decoder is None:
                text = self._sp.decode(ids)
            else:
                text = self._decoder.decode([self.id_to_token(i) or "" for i in ids])
        return _clean_up(text) if self.clean_up_spaces else text

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _identity_normalizer_patch() -> bytes:
    """Protobuf bytes that, appended to a sentencepiece ModelProto, merge into its normalizer_spec
    (field 3): name "identity", no precompiled charsmap, add_dummy_prefix=false,
    remove_extra_whitespaces=false. Protobuf merges repeated message fields; last scalar wins."""
    def field(num, payload: bytes) -> bytes:
        return _varint(num << 3 | 2) + _varint(len(payload)) + payload

    spec = field(1, b"identity") + field(2, b"") + _varint(3 << 3) + b"\x00" + _varint(4 << 3) + b"\x00"
    return field(3, spec)


def _decoder_from_json(decoder: dict):
    """A `tokenizers` decoder from its JSON description (via a tokenizer with an empty model)."""
    from tokenizers import Tokenizer as HFTokenizer

    skeleton = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": None, "post_processor": None, "decoder": decoder,
                "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"}}
    try:
        return HFTokenizer.from_str(json.dumps(skeleton)).decoder
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"the tokenizer's decoder description does not load ({e}); upgrade llmpack")


def _clean_up(text: str) -> str:
    # transformers' clean_up_tokenization (applied only where transformers applies it).
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


class StreamDecoder:
    """Turns a token stream into text pieces without ever emitting half a UTF-8 character.

    Decodes a short window of recent tokens and emits what was added since the last call,
    holding back while the text ends in U+FFFD (an incomplete multi-byte sequence, e.g. an emoji
    whose bytes are spread over several byte-level / byte-fallback tokens). The window restarts
    at a token boundary after every emitted piece, so the concatenated pieces equal
    `decode(all ids)` and the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_start = 0  # tokens before this are fully emitted and forgotten
        self.read_start = 0

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_start:self.read_start])
        text = self._decode(self.ids[self.prefix_start:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            piece = text[len(prefix):]
            self.prefix_start = self.read_start
            self.read_start = len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence at the very end comes out as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_start:self.read_start])
        text = self._decode(self.ids[self.prefix_start:])
        self.prefix_start = self.read_start = len(self.ids)
        return text[len(prefix):]
