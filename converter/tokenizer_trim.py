"""Tokenizer surgery for vocabulary trimming: which token ids stay, and the tokenizer that only knows them.

The embedding and the head of a small model are mostly vocabulary (Qwen2.5-0.5B: 151,936 rows
each, 43 % of the parameters). Most rows serve text the model will rarely see, so
`convert --vocab-size N` keeps N of them:

* protected, always kept: every added/special token, the tokens the header names (BOS, EOS,
  pad, unk, the generation config's ids; the chat template's markers such as <|im_start|> are
  added tokens), and the base alphabet, so any UTF-8 text still encodes: the 256 byte symbols
  of a byte-level BPE, or <0x00>..<0xFF> of a byte-fallback (sentencepiece-style) BPE;
* then the tokens a corpus uses most (the original tokenizer's encoding of it), ties and unseen
  tokens ranked by their merge rank (the BPE's own frequency order from its training corpus);
* closed under BPE construction: a kept token made by merge (a, b) keeps a and b. Merges that
  produce a removed token are removed. Then the trimmed tokenizer applies exactly the original's
  merges to any word whose original tokens are all kept (each merge it applies is kept, and no
  lower-ranked kept merge can apply where the original's did not), so it tokenizes such text
  identically; other words end in shorter kept pieces, at worst bytes.

Ids are renumbered densely in their original order; `TrimPlan.kept[new] = old`. Works on
`tokenizers` BPE models (tokenizer.json, kind "hf_json"); a bare sentencepiece tokenizer.model is
refused with a one-line error.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

from llmpack.formats.errors import LlmpackError

GENERATION_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclass
class TrimPlan:
    kept: np.ndarray  # (N,) old ids, ascending: new id i was old id kept[i]
    new_of_old: np.ndarray  # (old rows,) new id or -1
    blob: bytes  # the trimmed tokenizer.json
    generation: dict  # generation config with ids renumbered
    config: dict  # config.json with vocab_size and token ids renumbered
    protected: int  # size of the protected set (closed under merges): the smallest allowed N
    corpus: str  # what the counts came from
    rows: int  # rows of the original embedding


def byte_alphabet() -> list[str]:
    """The 256 symbols a byte-level BPE spells bytes with (GPT-2's byte -> character table)."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def _flatten(component) -> list[dict]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        items = component.get("pretokenizers") or component.get("decoders") or component.get("processors") or []
        return [x for c in items for x in _flatten(c)]
    return [component]


class BpeTokenizerJson:
    """A tokenizer.json with a BPE model: vocabulary, merges and what must never be removed."""

    def __init__(self, blob: bytes, what: str = "the tokenizer"):
        self.doc = json.loads(blob.decode("utf-8"))
        model = self.doc.get("model") or {}
        if model.get("type") != "BPE":
            raise LlmpackError(f"--vocab-size: {what} is a {model.get('type')} model; vocabulary trimming "
                               f"handles BPE tokenizers (tokenizer.json), convert without --vocab-size")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise LlmpackError(f"--vocab-size: {what} uses subword prefixes/suffixes in its merges, which "
                               f"vocabulary trimming does not handle; convert without --vocab-size")
        self.model = model
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.merge_strings = isinstance(model["merges"][0], str) if model["merges"] else False
        self.merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.added = {int(t["id"]): t["content"] for t in self.doc.get("added_tokens", [])}
        self.token_of = {i: t for t, i in self.vocab.items()}
        self.token_of.update(self.added)
        self.id_of = {t: i for i, t in self.token_of.items()}
        self.producers: dict[int, list[tuple[int, int]]] = {}
        self.merge_rank: dict[int, int] = {}
        for rank, (a, b) in enumerate(self.merges):
            ia, ib, ir = self.vocab.get(a), self.vocab.get(b), self.vocab.get(a + b)
            if ia is None or ib is None or ir is None:
                continue  # a dangling merge: tokenizers ignores it too
            self.producers.setdefault(ir, []).append((ia, ib))
            self.merge_rank.setdefault(ir, rank)

    def base_alphabet(self) -> set[int]:
        """Ids that let any UTF-8 text encode: byte-level symbols, byte-fallback tokens, or (for a
        character BPE without either) every token no merge produces."""
        pre = _flatten(self.doc.get("pre_tokenizer")) + _flatten(self.doc.get("decoder"))
        if any(p.get("type") == "ByteLevel" for p in pre):
            return {self.vocab[c] for c in byte_alphabet() if c in self.vocab}
        if self.model.get("byte_fallback"):
            return {self.vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in self.vocab}
        return {i for i in self.vocab.values() if i not in self.producers}

    def closure(self, ids, kept: set[int] | None = None) -> set[int]:
        """`ids` and every token their merges are built from (minus what `kept` already holds)."""
        kept = kept or set()
        out, stack = set(), [i for i in ids if i not in kept]
        while stack:
            i = stack.pop()
            if i in out or i in kept:
                continue
            out.add(i)
            for a, b in self.producers.get(i, ()):
                stack += [a, b]
        return out

    def trimmed(self, new_of_old: np.ndarray) -> bytes:
        """tokenizer.json over the kept ids, renumbered; merges producing a removed token removed."""
        def new(i):
            return int(new_of_old[i]) if 0 <= i < len(new_of_old) else -1

        doc = json.loads(json.dumps(self.doc))  # a deep copy
        model = doc["model"]
        model["vocab"] = {t: new(i) for t, i in sorted(self.vocab.items(), key=lambda kv: kv[1]) if new(i) >= 0}
        merges = []
        for a, b in self.merges:
            r, ia, ib = self.vocab.get(a + b), self.vocab.get(a), self.vocab.get(b)
            if r is None or ia is None or ib is None or new(r) < 0:
                continue  # produces a removed token (or dangles: tokenizers ignores it too)
            assert new(ia) >= 0 and new(ib) >= 0, (a, b)  # the kept set is closed under merges
            merges.append(f"{a} {b}" if self.merge_strings else [a, b])
        model["merges"] = merges
        for t in doc.get("added_tokens", []):
            t["id"] = new(int(t["id"]))
        _renumber_processor(doc.get("post_processor"), new)
        if isinstance(doc.get("padding"), dict) and isinstance(doc["padding"].get("pad_id"), int):
            doc["padding"]["pad_id"] = max(new(doc["padding"]["pad_id"]), 0)
        return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def _renumber_processor(proc, new):
    """Special-token ids inside a post-processor (TemplateProcessing, Bert/Roberta, Sequence)."""
    if not isinstance(proc, dict):
        return
    for p in proc.get("processors") or []:
        _renumber_processor(p, new)
    for spec in (proc.get("special_tokens") or {}).values():
        if isinstance(spec, dict) and isinstance(spec.get("ids"), list):
            spec["ids"] = [new(int(i)) for i in spec["ids"]]
    for key in ("sep", "cls"):
        if isinstance(proc.get(key), list) and len(proc[key]) == 2:
            proc[key][1] = new(int(proc[key][1]))


def _ids_in(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _renumber_ids(section: dict, new, keys=GENERATION_ID_KEYS) -> dict:
    out = dict(section)
    for key in keys:
        v = section.get(key)
        if isinstance(v, list):
            out[key] = [new(i) for i in _ids_in(v) if new(i) >= 0]
        elif _ids_in(v):
            out[key] = new(v) if new(v) >= 0 else None
    return out


def protected_ids(bpe: BpeTokenizerJson, section: dict, generation: dict, rows: int) -> set[int]:
    """Every id that must survive, closed under merges (its size is the smallest allowed N)."""
    ids = set(bpe.added) | bpe.base_alphabet()
    texts = list((section.get("special") or {}).values()) + [bpe.model.get("unk_token")]
    ids |= {bpe.id_of[t] for t in texts if isinstance(t, str) and t in bpe.id_of}
    for key in GENERATION_ID_KEYS:
        ids |= set(_ids_in(generation.get(key)))
    return {i for i in bpe.closure(ids) if 0 <= i < rows}


def count_tokens(section: dict, blob: bytes, texts: list[str]) -> Counter:
    """How often the original tokenizer emits each id on the corpus."""
    from llmpack.runtime.tokenizer import Tokenizer

    tok = Tokenizer(section, blob)
    counts = Counter()
    for text in texts:
        counts.update(tok.encode(text, add_special_tokens=False))
    return counts


def choose(bpe: BpeTokenizerJson, protected: set[int], counts: Counter, rows: int, size: int | None) -> list[int]:
    """Kept old ids: the protected set, then by corpus count (then merge rank), each with its merge
    parents, until `size` (None: every token the corpus uses)."""
    kept = set(protected)
    never = float("inf")
    candidates = [i for i in bpe.token_of if 0 <= i < rows and i not in kept and (size is not None or counts[i])]
    candidates.sort(key=lambda i: (-counts[i], bpe.merge_rank.get(i, never), i))
    limit = size if size is not None else rows
    for i in candidates:
        if len(kept) >= limit:
            break
        extra = bpe.closure([i], kept)
        if len(kept) + len(extra) <= limit:
            kept |= extra
    return sorted(kept)


def plan(tokenizer: tuple, generation: dict, config: dict, rows: int, size: int | None, texts: list[str],
         corpus: str, check=None) -> TrimPlan:
    """The trim: kept ids, the renumbered tokenizer and id fields. `check(protected, rows)` validates
    the requested size against the model (recipe.VocabOptions.check_model) before any counting."""
    section, _name, blob = tokenizer
    if section.get("kind") != "hf_json":
        raise LlmpackError("--vocab-size: the checkpoint has only a sentencepiece tokenizer.model; vocabulary "
                           "trimming needs a tokenizer.json (BPE); convert without --vocab-size")
    bpe = BpeTokenizerJson(blob)
    beyond = sorted(i for i in bpe.added if i >= rows)
    if beyond:
        raise LlmpackError(f"--vocab-size: added token id {beyond[0]} lies beyond the embedding's {rows} rows; "
                           f"the checkpoint's tokenizer and weights disagree")
    protected = protected_ids(bpe, section, generation, rows)
    if check is not None:
        check(len(protected), rows)
    kept = np.asarray(choose(bpe, protected, count_tokens(section, blob, texts), rows, size), np.int64)
    new_of_old = np.full(max(rows, max(bpe.token_of) + 1), -1, np.int64)
    new_of_old[kept] = np.arange(len(kept))

    def new(i):
        return int(new_of_old[i]) if 0 <= i < len(new_of_old) else -1

    cfg = _renumber_ids(config, new)
    if "vocab_size" in cfg:
        cfg["vocab_size"] = len(kept)
    return TrimPlan(kept=kept, new_of_old=new_of_old, blob=bpe.trimmed(new_of_old),
                    generation=_renumber_ids(generation, new), config=cfg, protected=len(protected), corpus=corpus,
                    rows=rows)
