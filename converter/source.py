"""Read: the checkpoint's tensors under canonical names, rewritten, loaded group by group.

Rewrites are data: each family's table (converter/arch.py) names one of REWRITES per tensor,
and each rewrite says both what it does to the array and to the shape (so the converter
plans the whole file from the safetensors headers before loading anything).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from llmpack.formats.errors import LlmpackError

from .arch import map_name


@dataclass(frozen=True)
class Rewrite:
    array: Callable[[str, np.ndarray], list]  # (canonical name, array) -> [(name, array), ...]
    shape: Callable[[str, tuple], list]  # (canonical name, shape) -> [(name, shape), ...]


def _split_qkv(name, arr):  # GPT-2 Conv1D c_attn: weight (D, 3D) -> q, k, v each (D, D)
    arr = arr.T if arr.ndim == 2 else arr
    return [(name.replace("{q,k,v}", x), np.ascontiguousarray(p)) for x, p in zip("qkv", np.split(arr, 3, axis=0))]


def _split_qkv_shape(name, shape):
    part = (shape[1] // 3, shape[0]) if len(shape) == 2 else (shape[0] // 3,)
    return [(name.replace("{q,k,v}", x), part) for x in "qkv"]


REWRITES: dict[str | None, Rewrite] = {
    None: Rewrite(lambda n, a: [(n, a)], lambda n, s: [(n, s)]),
    # Gemma's RMSNorm scales by (1 + w): stored as a plain scale.
    "plus1": Rewrite(lambda n, a: [(n, a + np.float32(1.0))], lambda n, s: [(n, s)]),
    # GPT-2's Conv1D keeps weights (in, out): transposed to (out, in).
    "T": Rewrite(lambda n, a: [(n, np.ascontiguousarray(a.T) if a.ndim == 2 else a)],
                 lambda n, s: [(n, s[::-1] if len(s) == 2 else s)]),
    # OPT reserves two position rows: dropped so position p reads row p.
    "opt_pos": Rewrite(lambda n, a: [(n, a[2:])], lambda n, s: [(n, (s[0] - 2,) + tuple(s[1:]))]),
    "qkv": Rewrite(_split_qkv, _split_qkv_shape),
}


def apply_rewrite(name: str, arr: np.ndarray, rewrite: str | None) -> list[tuple[str, np.ndarray]]:
    return REWRITES[rewrite].array(name, arr)


def order_key(name: str):
    """embed first, then layers in order, then the final norm and head: sequential reads at runtime."""
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith(("embed", "pos_embed", "rope")) else 2, 0, name)


def plan_names(ckpt, fam, mt: str) -> list[tuple[str, str, str | None]]:
    """(hf name, canonical name, rewrite) for every tensor the family maps (ignored ones dropped)."""
    plan = []
    for hf in ckpt.tensor_names():
        try:
            canon, rewrite = map_name(fam, hf)
        except KeyError:
            raise LlmpackError(f"tensor {hf!r} of this {mt} checkpoint is not mapped by llmpack; "
                               f"the checkpoint has parts llmpack does not know how to run")
        if canon is not None:
            plan.append((hf, canon, rewrite))
    return plan


def canonical_shapes(ckpt, plan) -> tuple[dict, dict]:
    """Canonical name -> shape (from the safetensors headers, nothing loaded), and -> HF name."""
    shapes, hf_of = {}, {}
    for hf, canon, rewrite in plan:
        shape = ckpt.shape(hf)
        for name, s in REWRITES[rewrite].shape(canon, shape):
            shapes[name] = tuple(s)
            hf_of[name] = hf
    return shapes, hf_of


class TensorSource:
    """The checkpoint's tensors under canonical names, read (and rewritten) group by group:
    `pre` (embeddings), `layers[i]`, `post` (final norm, head) — lists of plan entries."""

    def __init__(self, ckpt, plan, n_layers):
        self.ckpt = ckpt
        self.pre, self.post = [], []
        self.layers = [[] for _ in range(n_layers)]
        for entry in plan:
            m = re.match(r"layers\.(\d+)\.", entry[1])
            if m:
                self.layers[int(m.group(1))].append(entry)
            elif entry[1].startswith(("embed", "pos_embed")):
                self.pre.append(entry)
            else:
                self.post.append(entry)

    def load(self, entries) -> dict[str, np.ndarray]:
        out = {}
        for hf, canon, rewrite in entries:
            out.update(apply_rewrite(canon, self.ckpt.get(hf), rewrite))
        return out

    def weights(self) -> dict:
        """Number of weights of `pre`, each layer and `post` (from the headers: nothing is read)."""
        def count(entries):
            return sum(math.prod(self.ckpt.shape(hf)) for hf, _, _ in entries)
        return {"pre": count(self.pre), "layers": [count(e) for e in self.layers], "post": count(self.post)}

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's tensors under short names ("attn.q.weight")."""
        prefix = f"layers.{i}."
        return {n[len(prefix):]: a for n, a in self.load(self.layers[i]).items()}
