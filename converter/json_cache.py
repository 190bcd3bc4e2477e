"""Measurements kept beside --sensitivity FILE (FILE.vocab.json, FILE.structure.json): a JSON
object {"key": what the value depends on, "value": the measurement}, reused only when the key
matches, replaced whole (written to FILE.tmp, then renamed: never half-written)."""
from __future__ import annotations

import json
from pathlib import Path

from llmpack.formats.errors import LlmpackError


def load(path, key):
    """The value kept in `path` under `key`; None when absent, unreadable or made for another key."""
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data.get("value") if isinstance(data, dict) and data.get("key") == key else None


def store(path, key, value):
    """Keep `value` under `key` in `path` (nothing when `path` is None)."""
    if path is None:
        return
    tmp = Path(str(path) + ".tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "value": value}))
        tmp.replace(path)
    except OSError as e:
        raise LlmpackError(f"cannot write {path}: {e.strerror}")
