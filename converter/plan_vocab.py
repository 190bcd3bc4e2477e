"""The planner's vocabulary side: which vocabulary sizes it weighs, and what each costs in quality.

Trimming to N tokens (tokenizer_trim.py) removes rows of the embedding and of the head: on the
off-grid Qwen2.5-Coder-0.5B each 1,000 rows are 1.8 M parameters (two 896-wide matrices), so
trimming 151,936 -> 32,768 frees as many bytes as 1.3 bits per weight of the blocks. Its cost is
measured, not guessed: the source model reads calibration text with the trimmed tokenizer and
predicts only kept tokens (the trimmed model is the same weights with those rows gathered, so this
is exactly its loss before quantization); the damage is the increase of the negative
log-likelihood per byte of text over the full vocabulary's, in nats. Quantization damages
(sensitivity.py: nats of KL per token) go on the same scale divided by the calibration text's
bytes per token, and the planner picks the vocabulary and the bits whose summed damage per byte
is least (plan.py).

The candidates: the full vocabulary and trims that keep the protected tokens (specials, template
and generation ids, the byte alphabet, closed under merges) plus 50, 25, 10 and 5 % of the
others, or only the vocabulary --vocab-size/--vocab-from ask for. Trimming needs a
tokenizer.json (BPE); a sentencepiece model keeps its full vocabulary. The damage is measured on
the last fifth of the calibration text, which is cut out of the corpus the tokens are counted on
(with the defaults the corpus is the calibration text): a trim judged on the text it was chosen
from would look free. It stays optimistic for text unlike the calibration text
(the evaluation after conversion says how much).
"""
from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpack.formats.errors import LlmpackError

from . import json_cache

SHARES = (0.5, 0.25, 0.1, 0.05)  # of the removable tokens kept, per candidate
WINDOWS = 4  # calibration text windows of at most the calibration length, scored per candidate
HELD_OUT = 5  # the damage is measured on the last 1/HELD_OUT of the calibration text's lines
LN2 = math.log(2)


@dataclass
class VocabChoice:
    """One vocabulary the planner weighs: `trim` None is the full vocabulary."""

    trim: object  # tokenizer_trim.TrimPlan | None
    damage: float  # nats per byte of calibration text, over the full vocabulary's loss

    @property
    def size(self) -> int | None:
        return None if self.trim is None else int(len(self.trim.kept))

    def record(self) -> dict:
        return {"size": self.size, "damage_nats_per_byte": round(self.damage, 6)}


@dataclass
class VocabScale:
    """What puts per-token damages on the per-byte scale of the vocabulary's."""

    bytes_per_token: float  # calibration text bytes per token of the full tokenizer
    nll_per_byte: float  # the full model's loss on it (nats per byte)


def _split(recipe) -> tuple[str, list[str], str]:
    """(text the damage is measured on, corpus texts the tokens are counted on, corpus name).
    The damage is measured on the last fifth of the calibration text's lines, and that text is
    cut out of the corpus wherever it occurs (with the defaults the corpus is the calibration text)."""
    from .quantize import calib as calib_mod

    text, _ = calib_mod.read_text(recipe.quant.calib)
    lines = text.splitlines(keepends=True)
    held = "".join(lines[len(lines) - max(1, len(lines) // HELD_OUT):])
    texts, corpus = recipe.vocab.texts()
    cut = [t.replace(held, "") for t in texts]
    if cut != texts:
        corpus += " (without the text the damage is measured on)"
    return held, cut, corpus


def trims(r, recipe, check) -> list:
    """Trim plans of the candidate sizes (the one --vocab-size/--vocab-from asks for, if given);
    an empty list for a tokenizer that trimming cannot edit."""
    from . import tokenizer_trim

    if r.tokenizer[0].get("kind") != "hf_json":
        if recipe.vocab.active:
            raise LlmpackError("--vocab-size: the checkpoint has only a sentencepiece tokenizer.model; vocabulary "
                               "trimming needs a tokenizer.json (BPE); convert without --vocab-size")
        return []
    _, texts, corpus = _split(recipe)
    rows = r.shapes["embed.weight"][0]
    generation = {k: v for k, v in r.ckpt.json_file("generation_config.json").items() if k != "transformers_version"}

    def trim(n):
        return tokenizer_trim.plan(r.tokenizer, generation, r.ckpt.config_dict, rows, n, texts, corpus, check=check)

    if recipe.vocab.active:
        return [trim(recipe.vocab.size)]
    try:
        protected = trim(rows - 1).protected
    except LlmpackError:  # a tokenizer trimming cannot edit (WordPiece, Unigram): the planner keeps it whole
        return []
    sizes = sorted({protected + math.ceil(f * (rows - protected)) for f in SHARES}, reverse=True)
    return [trim(n) for n in sizes if protected <= n < rows]


@dataclass
class Measured:
    """What the planner's one forward pass over held-out calibration text gives."""

    vocabs: list  # VocabChoice per candidate, the full vocabulary first (damage 0)
    scale: VocabScale
    tie_damage: float | None  # tying the head (steps/tie_head.py), nats per byte; None: not applicable


def measure(r, recipe, plans: list, tie: bool, quiet: bool = False, cache=None) -> Measured:
    """Each vocabulary candidate's damage, tying's damage (when `tie`), and the per-byte scale."""
    from llmpack.runtime import quality_cross
    from llmpack.runtime.quality import Accumulator
    from llmpack.runtime.tokenizer import Tokenizer

    text, _, _ = _split(recipe)
    key = _key(r, plans, text, recipe.quant.calib_seqlen, tie)
    found = json_cache.load(cache, key)
    if found is not None:
        if not quiet:
            print(f"plan: reused the vocabulary and head measurement in {cache}", file=sys.stderr)
        return _measured(plans, found)
    full = Tokenizer(r.tokenizer[0], r.tokenizer[2])
    toks = [Tokenizer(r.tokenizer[0], p.blob) for p in plans]
    pieces = quality_cross.text_windows([full] + toks, text, WINDOWS, recipe.quant.calib_seqlen)
    run = _Forward(r.ckpt.dir, tie, quiet)
    accs = [quality_cross.CrossAccumulator(t, full) for t in toks]
    tie_acc = Accumulator()
    ref_bits = ref_bytes = ref_tokens = 0.0
    for n, piece in enumerate(pieces):
        ref_ids = quality_cross.window_ids(full, piece)
        own_ids = [quality_cross.window_ids(tok, piece) for tok in toks]
        if min(len(i) for i in [ref_ids] + own_ids) < 2:
            continue
        ref, tied = run(ref_ids)
        ref_bits += _bits(ref, ref_ids)
        ref_bytes += quality_cross.scored_bytes(full, ref_ids)
        ref_tokens += len(ref_ids) - 1
        if tied is not None:
            tie_acc.add(ref, tied, ref_ids)
        for p, ids, acc in zip(plans, own_ids, accs):
            acc.add(ref, ref_ids, run(p.kept[np.asarray(ids, np.int64)])[0][:, p.kept], ids)
        if not quiet:
            print(f"plan: vocabulary and head damage, window {n + 1}/{len(pieces)}", file=sys.stderr)
    if not ref_bytes:
        raise LlmpackError("the calibration text is too short to measure what trimming the vocabulary or tying "
                           "the head costs; give a longer --calib, or --keep-vocab")
    bpt = ref_bytes / max(ref_tokens, 1)
    value = {"damages": [max(0.0, LN2 * (a.bits["file"] / a.bytes["file"] - a.bits["ref"] / a.bytes["ref"]))
                         for a in accs],
             "bytes_per_token": bpt, "nll_per_byte": LN2 * ref_bits / max(ref_bytes, 1),
             "tie_kld_per_token": tie_acc.report()["kld"] if tie_acc.n else None}
    json_cache.store(cache, key, value)
    return _measured(plans, value)


def _measured(plans, value) -> Measured:
    scale = VocabScale(value["bytes_per_token"], value["nll_per_byte"])
    tie = value["tie_kld_per_token"]
    return Measured([VocabChoice(None, 0.0)] + [VocabChoice(p, d) for p, d in zip(plans, value["damages"])], scale,
                    None if tie is None else tie / scale.bytes_per_token)


class _Forward:
    """The source model on one window: (logits, logits with the head tied through the fitted map or None)."""

    def __init__(self, folder, tie: bool, quiet: bool):
        from .reference import hf_model

        self.model = hf_model(folder, quiet)
        self.tie = None
        if tie:
            from .steps.tie_head import fit

            E = self.model.get_input_embeddings().weight.detach().float().numpy()
            M, _ = fit(E, self.model.get_output_embeddings().weight.detach().float().numpy())
            self.tie = (E, M.astype(np.float32))
        self.cap = getattr(self.model.config, "final_logit_softcapping", None)

    def __call__(self, ids):
        import torch

        with torch.no_grad():
            t = torch.as_tensor(np.asarray(ids, np.int64)[None])
            logits = self.model(t).logits[0].float().numpy()
            if self.tie is None:
                return logits, None
            E, M = self.tie
            z = (self.model.base_model(t).last_hidden_state[0].float().numpy() @ M.T) @ E.T
            return logits, np.tanh(z / self.cap) * self.cap if self.cap else z


def _bits(logits, ids) -> float:
    from llmpack.runtime.quality_cross import log_softmax

    tgt = np.asarray(ids[1:], np.int64)
    lp = log_softmax(logits[:len(tgt)])
    return float(-lp[np.arange(len(tgt)), tgt].sum()) / LN2


def _key(r, plans, text: str, seqlen: int, tie: bool) -> dict:
    kept = hashlib.sha256(b"".join(np.ascontiguousarray(p.kept).tobytes() for p in plans)).hexdigest()
    return {"source": r.ckpt.sha256_files(), "kept": kept, "text": hashlib.sha256(text.encode()).hexdigest(),
            "windows": WINDOWS, "seqlen": seqlen, "tie": tie}


def cache_path(sensitivity_file) -> Path | None:
    """The vocabulary measurement is kept beside --sensitivity FILE (FILE.vocab.json)."""
    return None if sensitivity_file is None else Path(str(sensitivity_file) + ".vocab.json")
