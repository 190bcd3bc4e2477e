"""Structured pruning of attention head groups and MLP neurons, by calibrated importance.

Importance is Wanda's |W| * ||x|| (Sun et al., 2023) lifted to structures: an MLP neuron j
scores ||W_down[:, j]|| * ||u_j|| (u: the down projection's input over the calibration tokens),
a KV head group the sum over its query heads of ||W_o[:, head]||_F * ||ctx_head||_F. The
lowest-scoring structures go; what they contributed on average is added to the output bias
(FLAP's bias compensation, An et al., 2024), so the block's mean output is kept.

Pruning is iterative along the stream: block i is scored on activations that already passed
through the pruned (and otherwise compressed) blocks before it; inside a block the heads go
first, and the MLP is scored on its input after head pruning. Per-block widths may differ; the
runtime reads them from the tensor shapes.
"""
from __future__ import annotations

import numpy as np

from ..stream import Step, Stream


class _Captured(Exception):
    """Stops a block run once the wanted stage's input is captured."""


def stage_input(s: Stream, j: int, t: dict, x, stage: str) -> np.ndarray:
    """The input of `stage` (see runtime/numpy_block.py) of block j on the calibration batch x."""
    seen = {}

    def grab(name, _names, X):
        if name == stage:
            seen["X"] = X
            raise _Captured
        return None

    try:
        s.runner(j, t).run(x, grab)
    except _Captured:
        pass
    return seen["X"].reshape(-1, seen["X"].shape[-1])


def keep_top(scores: np.ndarray, n_remove: int) -> np.ndarray:
    """Indices (sorted) of all but the n_remove lowest scores; ties keep the earlier index."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[n_remove:])


def compensate(t: dict, lin: str, cols: np.ndarray, mean_in: np.ndarray):
    """Add what the removed input columns `cols` of linear `lin` contributed on average."""
    if len(cols) == 0:
        return
    W = t[lin + ".weight"]
    extra = (W[:, cols].astype(np.float64) @ mean_in[cols]).astype(np.float32)
    t[lin + ".bias"] = t[lin + ".bias"] + extra if lin + ".bias" in t else extra


def mlp_scores(t: dict, U: np.ndarray) -> np.ndarray:
    return np.linalg.norm(t["mlp.down.weight"], axis=0) * np.sqrt((U.astype(np.float64) ** 2).sum(axis=0))


def head_group_scores(t: dict, C: np.ndarray, hd: int, n_kv: int) -> np.ndarray:
    """Score per KV group from the attention context C (tokens, H*hd)."""
    H = C.shape[1] // hd
    Wo = t["attn.o.weight"].astype(np.float64)
    per_head = np.array([np.linalg.norm(Wo[:, h * hd:(h + 1) * hd]) *
                         np.sqrt((C[:, h * hd:(h + 1) * hd].astype(np.float64) ** 2).sum()) for h in range(H)])
    return per_head.reshape(n_kv, H // n_kv).sum(axis=1)


class PruneStep(Step):
    name = "prune"

    def __init__(self, heads: float = 0, mlp: float = 0):
        self.heads, self.mlp = heads, mlp
        self.removed = {"heads": 0, "neurons": 0}

    def options(self) -> dict:
        return {"heads": self.heads, "mlp": self.mlp, "removed_kv_groups": self.removed["heads"],
                "removed_neurons": self.removed["neurons"]}

    def layer(self, s: Stream, j: int, t: dict, x):
        if self.heads:
            self.prune_heads(s, j, t, x)
        if self.mlp:
            self.prune_mlp(s, j, t, x)
        return None

    def prune_heads(self, s: Stream, j: int, t: dict, x):
        hd = s.spec.head_dim
        n_kv = t["attn.k.weight"].shape[0] // hd
        n = int(self.heads) if self.heads >= 1 else int(round(n_kv * self.heads))
        n = min(n, n_kv - 1)
        if n <= 0:
            return
        C = stage_input(s, j, t, x, "o_in")
        keep = keep_top(head_group_scores(t, C, hd, n_kv), n)
        G = t["attn.q.weight"].shape[0] // hd // n_kv
        kv_rows = np.concatenate([np.arange(g * hd, (g + 1) * hd) for g in keep])
        q_rows = np.concatenate([np.arange(g * G * hd, (g + 1) * G * hd) for g in keep])
        gone = np.setdiff1d(np.arange(C.shape[1]), q_rows)
        compensate(t, "attn.o", gone, C.astype(np.float64).mean(axis=0))
        for lin, rows in (("attn.q", q_rows), ("attn.k", kv_rows), ("attn.v", kv_rows)):
            t[lin + ".weight"] = t[lin + ".weight"][rows]
            if lin + ".bias" in t:
                t[lin + ".bias"] = t[lin + ".bias"][rows]
        t["attn.o.weight"] = t["attn.o.weight"][:, q_rows]
        self.removed["heads"] += n

    def prune_mlp(self, s: Stream, j: int, t: dict, x):
        self.removed["neurons"] += prune_mlp(s, j, t, x, self.mlp)


def neurons_removed(width: int, fraction: float) -> int:
    """How many of a block's `width` MLP neurons pruning `fraction` removes (one always stays);
    the size planner lays out the file with the same count (plan_structure.py)."""
    return max(0, min(int(round(width * fraction)), width - 1))


def prune_mlp(s: Stream, j: int, t: dict, x, fraction: float) -> int:
    """Remove the `fraction` of block j's MLP neurons of least importance on x, compensating
    their mean contribution in the down projection's bias; returns how many went."""
    F = t["mlp.up.weight"].shape[0]
    n = neurons_removed(F, fraction)
    if n <= 0:
        return 0
    U = stage_input(s, j, t, x, "down_in")
    keep = keep_top(mlp_scores(t, U), n)
    compensate(t, "mlp.down", np.setdiff1d(np.arange(F), keep), U.astype(np.float64).mean(axis=0))
    for lin in ("mlp.gate", "mlp.up"):
        if lin + ".weight" in t:
            t[lin + ".weight"] = t[lin + ".weight"][keep]
            if lin + ".bias" in t:
                t[lin + ".bias"] = t[lin + ".bias"][keep]
    t["mlp.down.weight"] = t["mlp.down.weight"][:, keep]
    return n
