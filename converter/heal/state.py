"""Healing's checkpoints: a folder beside the output that a killed run resumes from.

`OUT.heal/` holds `key` (what the run is: source files, recipe, calibration tokens; a folder
with another key is stale and is emptied), one `block-NNN.npz` per healed block, the teacher's
targets for phase 2 (`teacher.npz`), the phase-1 file (`stage1.llmpack`) and phase 2's latest
optimizer state (`e2e.npz`). Every file is written to a temporary name and renamed, so a kill
leaves either the old or the new file. npz without pickle: data only. The folder is removed
when the converted file is in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np


class HealState:
    def __init__(self, out, key: dict, quiet: bool = False):
        self.dir = Path(str(out) + ".heal")
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        kf = self.dir / "key"
        if self.dir.is_dir() and (not kf.is_file() or kf.read_text() != self.key):
            shutil.rmtree(self.dir)  # another run's (or a different recipe's) checkpoints
        self.resumed = self.dir.is_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            self._atomic(kf, lambda p: p.write_text(self.key))
        elif not quiet:
            import sys

            print(f"heal: resuming from {self.dir}", file=sys.stderr)

    def path(self, name: str) -> Path:
        return self.dir / name

    @staticmethod
    def _atomic(path: Path, write):
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def save(self, name: str, arrays: dict):
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        self._atomic(self.path(name), write)

    def load(self, name: str) -> dict | None:
        p = self.path(name)
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)
