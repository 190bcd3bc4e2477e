"""The original model, streamed beside the student: block targets and next-token targets.

Placed first in the recipe's steps, it sees every block's tensors before any step changes
them, runs the original block on its own activations (the original model's, never the
student's) and keeps the output as the healing target. Blocks the layer-drop step removed
still run here. After the last block it keeps, per calibration token, the original's top-k
log-probabilities (plus the tail's mass) for the end-to-end phase: never the full
vocabulary (152k floats a token).
"""
from __future__ import annotations

import numpy as np

from ..original import OriginalModel, head_logits
from ..stream import Stream


class Teacher(OriginalModel):
    name = "teacher"

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.target = None  # the original output of the block in hand
        self.topk = None  # (indices (N, k) int32, log-probabilities (N, k) f32)

    def options(self) -> dict:
        return {"top_k": self.top_k}

    def layer(self, s: Stream, j: int, t: dict, x):
        super().layer(s, j, t, x)
        self.target = self.x
        return None

    def post(self, s: Stream, post: dict, x):
        h, head = self.finish(s, post)
        self.topk = top_logprobs(h.reshape(-1, h.shape[-1]), head, post.get("head.bias"), s.spec.final_softcap,
                                 self.top_k)
        self.target = None


def top_logprobs(h: np.ndarray, head: np.ndarray, bias, softcap, k: int, chunk: int = 256):
    """(indices (N, k) int32, log-probabilities (N, k) f32) of the k likeliest next tokens of each
    of N hidden states, computed `chunk` tokens at a time (a chunk's logits: chunk x V floats)."""
    n = h.shape[0]
    idx = np.empty((n, k), np.int32)
    lp = np.empty((n, k), np.float32)
    for a in range(0, n, chunk):
        z = head_logits(h[a:a + chunk], head, bias, softcap).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
        top = np.argpartition(-z, k - 1, axis=1)[:, :k]
        idx[a:a + chunk] = top
        lp[a:a + chunk] = np.take_along_axis(z, top, axis=1)
    return idx, lp
