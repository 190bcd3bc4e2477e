"""Storing the head once: a head that is the embedding up to a linear map becomes a tied head.

Qwen2.5's small models tie their head to the embedding, but the GGUF-derived checkpoints this
project builds from hold the matrix twice at different quantizations (~4 % apart), and the
off-grid form of such a checkpoint (tools/get_model.py) also folded the final norm and a rotation
into its head: there the head equals the embedding only up to a map M, H ~ E M. This step fits
M by least squares (float64 normal equations, D x D), drops the head, and stores M as
`head_proj.weight` (D x DL): logits = E (M h), the embedding's bytes serving both ends. It also
ties a sliced model's head (M then maps the last block's basis into the first's).

On the off-grid Qwen2.5-Coder-0.5B-Instruct (before quantization, 4 x 512 tokens of the shipped
evaluation text): the fit's residual is 4.4 % of the head's norm; KLD 0.0043 nats, top-1 95.7 %,
perplexity x1.0006 against the untied model, for 136 M parameters fewer (22 % of the checkpoint).
The planner (plan.py) weighs it against its measured damage like any other choice.
"""
from __future__ import annotations

import numpy as np

from llmpack.formats.errors import LlmpackError

from ..stream import Step, Stream


def fit(E: np.ndarray, H: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, float]:
    """(M (D, DL) minimizing ||E M - H|| with E (V, D) and H (V, DL), the residual's share of ||H||).
    Float64 normal equations summed over row chunks: memory is D x D plus a chunk, not V x D in float64."""
    D = E.shape[1]
    G, B = np.zeros((D, D)), np.zeros((D, H.shape[1]))
    for a in range(0, len(E), chunk):
        e = E[a:a + chunk].astype(np.float64)
        G += e.T @ e
        B += e.T @ H[a:a + chunk].astype(np.float64)
    G[np.diag_indices_from(G)] += 1e-9 * np.trace(G) / D  # an embedding with unused directions stays solvable
    M = np.linalg.solve(G, B)
    res = norm = 0.0
    for a in range(0, len(E), chunk):
        h = H[a:a + chunk].astype(np.float64)
        res += float(((E[a:a + chunk].astype(np.float64) @ M - h) ** 2).sum())
        norm += float((h ** 2).sum())
    return M, float(np.sqrt(res / max(norm, 1e-300)))


def applicable(model: dict, shapes: dict) -> bool:
    """An untied head without a bias: what tying can store once."""
    return not model["tied_head"] and "head.bias" not in shapes


def check_model(model: dict, shapes: dict):
    """--tie-head needs an untied head without a bias (one line naming the problem otherwise)."""
    if model["tied_head"]:
        raise LlmpackError("--tie-head: this checkpoint's head already is its embedding (tied); drop --tie-head")
    if "head.bias" in shapes:
        raise LlmpackError("--tie-head: the head has a bias, which a tied head cannot keep; drop --tie-head")


class TieHeadStep(Step):
    name = "tie_head"

    def __init__(self):
        self.embed = None  # the embedding as the earlier steps left it (trimmed, rotated), float
        self.residual = None

    def options(self) -> dict:
        return {"residual": round(self.residual, 6) if self.residual is not None else None}

    def pre(self, s: Stream, pre: dict):
        self.embed = pre["embed.weight"]  # steps replace, never edit, the array

    def post(self, s: Stream, post: dict, x):
        M, self.residual = fit(self.embed, post.pop("head.weight"))
        post["head_proj.weight"] = M.astype(np.float32)  # (D, DL): the head's input h becomes h @ M^T
        s.model["tied_head"] = True
        self.embed = None
