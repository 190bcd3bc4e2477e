"""Tokenizers from the bytes embedded in the pack: tokenizer.json via `tokenizers`, or sentencepiece."""
from __future__ import annotations

from llmpack.formats.errors import FormatError


class Tokenizer:
    def __init__(self, section: dict, blob: bytes):
        self.kind = section["kind"]
        self.special = section.get("special", {})
        self.add_bos = section.get("add_bos", False)
        self.add_eos = section.get("add_eos", False)
        if self.kind == "hf_json":
            from tokenizers import Tokenizer as HFTokenizer

            self._tok = HFTokenizer.from_str(blob.decode("utf-8"))
            self._tok.no_padding()
            self._tok.no_truncation()
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            self._special_ids = {t.id for t in self._added_tokens() if t.special}
        elif self.kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=blob)
            self.vocab_size = self._sp.get_piece_size()
            self._special_ids = {i for i in range(self.vocab_size)
                                 if self._sp.is_control(i) or self._sp.is_unknown(i)}
        else:
            raise FormatError(f"unknown tokenizer kind {self.kind!r}; upgrade llmpack")

    def _added_tokens(self):
        return [_Added(i, t.content, t.special) for i, t in self._tok.get_added_tokens_decoder().items()]

    def token_to_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if self.kind == "hf_json":
            return self._tok.token_to_id(text)
        i = self._sp.piece_to_id(text)
        return None if i == self._sp.unk_id() and text != self._sp.id_to_piece(i) else i

    @property
    def bos_id(self):
        return self.token_to_id(self.special.get("bos_token"))

    @property
    def eos_id(self):
        return self.token_to_id(self.special.get("eos_token"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.kind == "hf_json":
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._encode_sp_with_specials(text)
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def _encode_sp_with_specials(self, text: str) -> list[int]:
        # sentencepiece would split "<start_of_turn>" into pieces; chat templates need it whole.
        specials = [p for p in (self._sp.id_to_piece(i) for i in self._special_ids) if p and len(p) > 1]
        specials += [v for v in self.special.values() if v]
        specials = sorted(set(specials), key=len, reverse=True)
        ids, rest = [], text
        while rest:
            hits = [(rest.find(s), s) for s in specials if s in rest]
            if not hits:
                ids += self._sp.encode(rest)
                break
            at, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            if at:
                ids += self._sp.encode(rest[:at])
            ids.append(self._sp.piece_to_id(s))
            rest = rest[at + len(s):]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf_json":
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._sp.decode(ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


class _Added:
    def __init__(self, id_, content, special):
        self.id, self.content, self.special = id_, content, special


class StreamDecoder:
    """Turns a token stream into text pieces without ever emitting half a UTF-8 character.

    Decodes a short window of recent tokens and emits what was added since the last call,
    holding back while the text ends in U+FFFD (an incomplete multi-byte sequence).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_start = 0  # tokens before this are fully emitted and forgotten
        self.read_start = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_start:self.read_start])
        text = self.tok.decode(self.ids[self.prefix_start:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            piece = text[len(prefix):]
            self.prefix_start = self.read_start
            self.read_start = len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        prefix = self.tok.decode(self.ids[self.prefix_start:self.read_start])
        text = self.tok.decode(self.ids[self.prefix_start:])
        self.prefix_start = self.read_start = len(self.ids)
        return text[len(prefix):]
