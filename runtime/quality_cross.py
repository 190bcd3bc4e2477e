"""Quality across tokenizers: bits per byte, and KLD / top-1 where both tokenize alike.

A trimmed vocabulary (`convert --vocab-size`) tokenizes text differently from its source, so
token positions no longer line up and per-token perplexities are not comparable. What stays
comparable is the text: each model is scored on the same text windows under its own
tokenization, in bits per byte,

    bpb = sum over scored tokens of -log2 p(token | its prefix) / UTF-8 bytes those tokens cover

(the first token of a window without BOS is context, not scored, and its bytes do not count).
The windows are consecutive pieces of the text cut at line ends (inside a line only when one
line alone exceeds the window), each short enough for every tokenizer to fit it in `ctx` tokens.

Where both models read the same context (the same token strings from the window's start: whole
windows tokenized alike, and the common prefix of the others), their next-token distributions
are compared as usual over the tokens both vocabularies hold: the reference's distribution is
renormalized over those (its mass on tokens the file lacks is reported separately as
`ref_mass_removed`), top-1 compares the reference's full argmax with the file's. Reported: the
share of windows tokenized alike and the share of positions compared. A trimmed vocabulary
that drops 4 % of a text's tokens leaves almost no 500-token window alike (Qwen 0.5B at 32k:
none of 16), so the common prefixes carry the comparison there (short contexts: biased to the
windows' starts).
"""
from __future__ import annotations

import math

import numpy as np

from llmpack.formats.errors import LlmpackError

LN2 = math.log(2.0)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def window_ids(tokenizer, text: str) -> list[int]:
    """A window's ids as the evaluation feeds them: BOS first where the tokenizer adds one."""
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False)


def scored_bytes(tokenizer, ids) -> int:
    """UTF-8 bytes covered by ids[1:] (the scored targets), given ids[0] as context. Measured by
    decoding, so a character split by a window edge counts as U+FFFD (3 bytes): at most a few
    bytes per window of ~2 kB, alike for both models of the same tokenizer."""
    ids = [int(i) for i in ids]
    full = len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
    return full - len(tokenizer.decode(ids[:1], skip_special_tokens=True).encode("utf-8"))


def text_windows(tokenizers: list, text: str, n_windows: int, ctx: int) -> list[str]:
    """Up to n_windows consecutive pieces of `text`, cut at line ends, each fitting in ctx tokens
    under every tokenizer (BOS included)."""
    def fits(piece: str) -> bool:
        return all(len(window_ids(t, piece)) <= ctx for t in tokenizers)

    units = []
    for line in text.splitlines(keepends=True):
        while line and not fits(line):  # a line longer than a window: its longest fitting prefix
            lo, hi = 1, len(line)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(line[:mid]) else (lo, mid - 1)
            units.append(line[:lo])
            line = line[lo:]
        if line:
            units.append(line)
    out, cur = [], ""
    for unit in units:
        if cur and not fits(cur + unit):
            out.append(cur)
            cur = ""
            if len(out) == n_windows:
                return out
        cur += unit
    if cur and (not out or len(out) < n_windows):
        out.append(cur)
    return out[:n_windows]


def vocab_map(file_tok, ref_tok, width: int) -> np.ndarray:
    """For each of the file's `width` logit rows, the reference's id of the same token (-1: none)."""
    out = np.full(width, -1, np.int64)
    for j in range(width):
        t = file_tok.id_to_token(j)
        i = ref_tok.token_to_id(t) if t is not None else None
        if i is not None:
            out[j] = i
    return out


class CrossAccumulator:
    """Sums over text windows scored by two models with their own tokenizers."""

    def __init__(self, file_tok, ref_tok):
        self.tok, self.ref_tok = file_tok, ref_tok
        self.map = None
        self.bits = {"file": 0.0, "ref": 0.0}
        self.bytes = {"file": 0, "ref": 0}
        self.tokens = {"file": 0, "ref": 0}
        self.windows = self.identical = 0
        self.kld, self.top1, self.removed_mass, self.n = [], 0, [], 0
        self.total_positions = 0

    def add(self, ref_logits, ref_ids, logits, ids, chunk: int = 64):
        for key, lg, tids, tok in (("ref", ref_logits, ref_ids, self.ref_tok), ("file", logits, ids, self.tok)):
            tgt = np.asarray(tids[1:])
            for a in range(0, len(tgt), chunk):  # in chunks: a 150k vocabulary is 1.2 MB a position
                lp = log_softmax(lg[a:a + chunk])[:len(tgt[a:a + chunk])]
                self.bits[key] += float(-lp[np.arange(len(lp)), tgt[a:a + chunk]].sum()) / LN2
            self.bytes[key] += scored_bytes(tok, tids)
            self.tokens[key] += len(tids) - 1
        self.windows += 1
        a_tokens = [self.ref_tok.id_to_token(i) for i in ref_ids]
        b_tokens = [self.tok.id_to_token(i) for i in ids]
        self.identical += a_tokens == b_tokens
        same = 0  # positions 0..same-1 have the same context (tokens 0..t) in both
        while same < min(len(a_tokens), len(b_tokens)) and a_tokens[same] == b_tokens[same]:
            same += 1
        end = min(same, len(ids) - 1, len(ref_ids) - 1)
        self.total_positions += len(ids) - 1
        if end < 1:
            return
        if self.map is None:
            self.map = vocab_map(self.tok, self.ref_tok, logits.shape[-1])
            self.valid = np.nonzero(self.map >= 0)[0]
            self.shared = self.map[self.valid]
        for a in range(0, end, chunk):
            b = min(end, a + chunk)
            lr_full = log_softmax(ref_logits[a:b])
            lr = log_softmax(ref_logits[a:b, self.shared])
            lq = log_softmax(logits[a:b, self.valid])
            self.kld.extend((np.exp(lr) * (lr - lq)).sum(axis=-1).tolist())
            self.top1 += int((lr_full.argmax(-1) == self.shared[lq.argmax(-1)]).sum())
            inside = np.exp(lr_full[:, self.shared]).sum(axis=-1)
            self.removed_mass.extend((1.0 - inside).tolist())
        self.n += end

    def report(self) -> dict:
        if not self.bytes["ref"] or not self.bytes["file"]:
            raise LlmpackError("the evaluation text has no scored bytes; give a longer text or a larger --ctx")
        bpb, bpb_ref = self.bits["file"] / self.bytes["file"], self.bits["ref"] / self.bytes["ref"]
        k = np.asarray(self.kld)
        return {
            "bpb": bpb, "bpb_ref": bpb_ref, "bpb_ratio": bpb / bpb_ref,
            "ppl": 2.0 ** (self.bits["file"] / self.tokens["file"]),
            "ppl_ref": 2.0 ** (self.bits["ref"] / self.tokens["ref"]), "ppl_ratio": None,
            "kld": float(k.mean()) if len(k) else None,
            "kld_p99": float(np.percentile(k, 99)) if len(k) else None,
            "top1": self.top1 / self.n if self.n else None,
            "ref_mass_removed": float(np.mean(self.removed_mass)) if self.removed_mass else None,
            "identical_windows": self.identical / self.windows,
            "compared_positions": self.n / max(self.total_positions, 1),
            "tokens": self.tokens["file"], "tokens_ref": self.tokens["ref"], "positions": self.n,
            "tokenization": "own",
        }
