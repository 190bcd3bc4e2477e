"""Calibration text: the shipped default or --calib FILE, tokenized and cut into samples.

The default text (data/calibration.txt) is the Python 3.11 tutorial, from the reStructuredText
sources in Debian's python3.11-doc package (Python Software Foundation License; see
data/SOURCE.md). It is prose mixed with code, a fit for general and coding models alike.
Evaluate on a different text, never on this one: `convert --eval` uses data/evaluation.txt
(three Python 3.11 HOWTOs), the benchmark the GNU Coding Standards.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from llmpack.formats.errors import LlmpackError

DEFAULT_NAME = "calibration.txt"
EVAL_NAME = "evaluation.txt"  # `convert --eval`: other chapters of the same docs (data/SOURCE.md)


def default_text() -> str:
    return resources.files(__package__).joinpath("data", DEFAULT_NAME).read_text(encoding="utf-8")


def default_eval_path() -> Path:
    """The shipped evaluation text (Python 3.11 HOWTOs): never calibrated on."""
    return Path(str(resources.files(__package__).joinpath("data", EVAL_NAME)))


def read_text(path) -> tuple[str, str]:
    """(text, name) for --calib FILE (None = the shipped default). Raises LlmpackError if unusable."""
    if path is None:
        return default_text(), f"default:{DEFAULT_NAME}"
    p = Path(path)
    if not p.is_file():
        raise LlmpackError(f"calibration file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LlmpackError(f"calibration file {path} cannot be read ({e.strerror})")
    if not text.strip():
        raise LlmpackError(f"calibration file {path} is empty")
    return text, p.name


def check_file(path):
    """Early check of --calib (before any work)."""
    if path is not None:
        read_text(path)


def samples(tokenizer, text: str, n_samples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """(B, T) token ids: `n_samples` windows of `seqlen` tokens at seeded random offsets (a BOS
    first where the tokenizer adds one). A short text gives shorter or overlapping windows."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    body = seqlen - (1 if bos is not None else 0)
    if len(ids) < 2 or body < 1:
        raise LlmpackError(f"calibration text has only {len(ids)} tokens; give a longer --calib text")
    body = min(body, len(ids))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - body + 1, n_samples)
    rows = [([bos] if bos is not None else []) + ids[s:s + body] for s in starts]
    return np.asarray(rows, np.int64)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
