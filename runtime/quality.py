"""Quality of a (quantized) model against a reference, over next-token distributions.

The text is tokenized with the file's tokenizer and cut into consecutive, non-overlapping
windows of `ctx` tokens (a BOS first where the tokenizer adds one); every position of a window
except the last predicts the next token of that window. Over all those positions:

    KLD    mean of KL(ref || file) = sum_v p_ref(v) (log p_ref(v) - log p_file(v))   (nats)
    top-1  fraction of positions where both models' most likely next token agree
    PPL    exp(mean negative log-likelihood of the actual next token), for each model

    bpb    bits per byte: the same negative log-likelihood in bits over the UTF-8 bytes the scored
           tokens cover, for each model (comparable across tokenizers)

All in float64 from each model's float32 logits. When the two models tokenize the text
differently (a trimmed vocabulary, `convert --vocab-size`), each is scored on the same text
windows under its own tokenization instead (runtime/quality_cross.py): bits per byte for both,
KLD and top-1 only where both read the same tokens (windows tokenized alike, and the common
prefix of the others), with the shares of windows and positions compared.
.llmpack files run on the numpy reference backend by default (exact dequantization, the format's
ground truth). Torch-free: the reference is another .llmpack or a callable; the
transformers-folder reference lives in llmpack.converter.reference (it imports torch).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from llmpack.formats.errors import LlmpackError

from . import quality_cross
from .progress import Progress


def read_text(path) -> tuple[str, str]:
    """(text, name) of an evaluation text file; LlmpackError if missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise LlmpackError(f"text file {path} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LlmpackError(f"text file {path} is empty")
    return text, p.name


def check_windows(n_windows: int, ctx: int, flags=("--windows", "--ctx")) -> None:
    """LlmpackError naming the option (`flags`: the caller's names) if the windows are unusable."""
    if ctx < 2:
        raise LlmpackError(f"{flags[1]} must be at least 2 tokens, got {ctx}")
    if n_windows < 1:
        raise LlmpackError(f"{flags[0]} must be at least 1, got {n_windows}")


def token_windows(tokenizer, text: str, n_windows: int, ctx: int) -> list[np.ndarray]:
    check_windows(n_windows, ctx)
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    body = ctx - (1 if bos is not None else 0)
    out = []
    for w in range(n_windows):
        chunk = ids[w * body:(w + 1) * body]
        if len(chunk) < body:
            break
        out.append(np.asarray(([bos] if bos is not None else []) + chunk, np.int64))
    if not out:
        raise LlmpackError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}; "
                           f"give a longer text or a smaller --ctx")
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Accumulator:
    """Sums over scored positions; `add` one window's logits (T, V) at a time."""

    def __init__(self):
        self.kld = []
        self.top1 = 0
        self.nll = 0.0
        self.nll_ref = 0.0
        self.n = 0
        self.bytes = 0

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, ids: np.ndarray, chunk: int = 64):
        if ref_logits.shape != logits.shape:
            raise LlmpackError(f"reference logits {ref_logits.shape} and file logits {logits.shape} differ: "
                               f"the two models do not share a vocabulary")
        tgt = np.asarray(ids)[1:]
        T = len(tgt)
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            lr = _log_softmax(ref_logits[a:b])
            lq = _log_softmax(logits[a:b])
            self.kld.extend((np.exp(lr) * (lr - lq)).sum(axis=-1).tolist())
            self.top1 += int((lr.argmax(-1) == lq.argmax(-1)).sum())
            rows = np.arange(b - a)
            self.nll += float(-lq[rows, tgt[a:b]].sum())
            self.nll_ref += float(-lr[rows, tgt[a:b]].sum())
            self.n += b - a

    def report(self) -> dict:
        k = np.asarray(self.kld)
        ppl, ppl_ref = float(np.exp(self.nll / self.n)), float(np.exp(self.nll_ref / self.n))
        out = {"kld": float(k.mean()), "kld_p99": float(np.percentile(k, 99)), "top1": self.top1 / self.n,
               "ppl": ppl, "ppl_ref": ppl_ref, "ppl_ratio": ppl / ppl_ref, "positions": self.n}
        if self.bytes:
            bpb, bpb_ref = self.nll / np.log(2) / self.bytes, self.nll_ref / np.log(2) / self.bytes
            out.update(bpb=float(bpb), bpb_ref=float(bpb_ref), bpb_ratio=float(bpb / bpb_ref))
        return out


def reference_fn(reference, backend: str = "numpy", quiet: bool = False):
    """`reference`: a callable ids -> logits (T, V) (e.g. llmpack.converter.reference for a
    transformers folder: torch stays out of the runtime), or a .llmpack path."""
    return reference_model(reference, backend)[0]


def reference_model(reference, backend: str = "numpy"):
    """(logits function, its tokenizer or None when `reference` is a bare callable)."""
    if callable(reference):
        return reference, None
    p = Path(reference)
    if p.is_dir():
        raise LlmpackError(f"reference {reference} is a folder: `llmpack eval` runs a transformers folder "
                           "(with llmpack[convert] installed); here pass an f32 .llmpack")
    if not p.is_file():
        raise LlmpackError(f"reference {reference} does not exist (give a .llmpack file or a transformers folder)")
    from .model import load

    m = load(p, backend=backend)
    return m.logits, m.tokenizer


def same_tokenization(tok, ref_tok, text: str) -> bool:
    """Both tokenizers give the same ids for `text` over the same vocabulary size."""
    return ref_tok is None or ref_tok is tok or (
        tok.vocab_size == ref_tok.vocab_size
        and tok.encode(text, add_special_tokens=False) == ref_tok.encode(text, add_special_tokens=False))


def evaluate_files(file, reference, text, windows: int = 16, ctx: int = 512, quiet: bool = False,
                   backend: str = "numpy", ref_tokenizer=None) -> dict:
    """Compare `file` (.llmpack) with `reference` (.llmpack or transformers folder) on `text`, a
    path or a (text, name) pair. Returns the report dict (figures + what was measured).
    `ref_tokenizer`: the reference's tokenizer when `reference` is a bare callable (None: the
    file's); a .llmpack reference brings its own."""
    from .model import load

    t0 = time.time()
    text, name = read_text(text) if not isinstance(text, tuple) else text
    model = load(file, backend=backend)
    check_windows(windows, ctx)
    ref, own_tok = reference_model(reference, backend)
    ref_tok = own_tok or ref_tokenizer
    if not same_tokenization(model.tokenizer, ref_tok, text):
        report = _evaluate_cross(model, ref, ref_tok, text, windows, ctx, quiet)
        report.update(text=name, text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                      ctx=ctx, seconds=round(time.time() - t0, 1))
        model.pack.close()
        return report
    wins = token_windows(model.tokenizer, text, windows, ctx)
    acc = Accumulator()
    progress = Progress("eval", len(wins), quiet=quiet)
    for i, ids in enumerate(wins):
        acc.add(ref(ids), model.logits(ids), ids)
        acc.bytes += quality_cross.scored_bytes(model.tokenizer, ids)
        progress.step(f"window {i + 1}")
    progress.done()
    report = acc.report()
    report.update(text=name, text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                  windows=len(wins), ctx=ctx, seconds=round(time.time() - t0, 1))
    model.pack.close()
    return report


def _evaluate_cross(model, ref, ref_tok, text: str, windows: int, ctx: int, quiet: bool) -> dict:
    """Each model on the same text windows under its own tokenization (see quality_cross)."""
    pieces = quality_cross.text_windows([model.tokenizer, ref_tok], text, windows, ctx)
    if not pieces:
        raise LlmpackError("the text is empty after cutting it into windows; give a longer text")
    acc = quality_cross.CrossAccumulator(model.tokenizer, ref_tok)
    progress = Progress("eval", len(pieces), quiet=quiet)
    for i, piece in enumerate(pieces):
        ids = quality_cross.window_ids(model.tokenizer, piece)
        ref_ids = quality_cross.window_ids(ref_tok, piece)
        if min(len(ids), len(ref_ids)) < 2:
            continue
        acc.add(ref(np.asarray(ref_ids, np.int64)), ref_ids, model.logits(ids), ids)
        progress.step(f"window {i + 1}")
    progress.done()
    report = acc.report()
    report["windows"] = acc.windows
    return report
