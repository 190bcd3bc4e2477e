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

from ..quantize.layers import LayerRunner, embed_tokens, final_hidden
from ..stream import Step, Stream


class Teacher(Step):
    name = "teacher"

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.x = None  # the original model's activations (B, T, D) entering block `self.next`
        self.next = 0  # the next source block to run
        self.target = None  # the original output of the block in hand
        self.embed = None  # the original embedding, kept for a tied head
        self.topk = None  # (indices (N, k) int32, log-probabilities (N, k) f32)

    def options(self) -> dict:
        return {"top_k": self.top_k}

    def pre(self, s: Stream, pre: dict):
        ids = s.ids
        rows = pre["embed.weight"][ids.ravel()].reshape(ids.shape + (-1,))
        self.x = embed_tokens(s.spec, rows, pre.get("pos_embed.weight"), ids)
        if s.model["tied_head"]:
            self.embed = pre["embed.weight"]  # steps replace, never edit, the array: this stays original

    def _run(self, s: Stream, i: int, t: dict):
        self.x = LayerRunner(s.spec, s.spec.blocks[i], t, s.inv_freq).run(self.x)
        self.next = i + 1

    def layer(self, s: Stream, j: int, t: dict, x):
        i = s.layers[j]
        for k in range(self.next, i):  # blocks the layer-drop step removed
            self._run(s, k, s.source.layer(k))
        self._run(s, i, t)  # read only: the later steps change t after this
        self.target = self.x
        return None

    def post(self, s: Stream, post: dict, x):
        for k in range(self.next, len(s.spec.blocks)):
            self._run(s, k, s.source.layer(k))
        h = final_hidden(s.spec.final_norm.kind, s.spec.norm_eps, self.x, post)
        head = self.embed if s.spec.tied else post["head.weight"]
        self.topk = top_logprobs(h.reshape(-1, h.shape[-1]), head, post.get("head.bias"), s.spec.final_softcap,
                                 self.top_k)
        self.x = self.target = self.embed = None


def top_logprobs(h: np.ndarray, head: np.ndarray, bias, softcap, k: int, chunk: int = 256):
    """(indices (N, k) int32, log-probabilities (N, k) f32) of the k likeliest next tokens of each
    of N hidden states, computed `chunk` tokens at a time (a chunk's logits: chunk x V floats)."""
    n = h.shape[0]
    idx = np.empty((n, k), np.int32)
    lp = np.empty((n, k), np.float32)
    for a in range(0, n, chunk):
        z = h[a:a + chunk].astype(np.float32) @ head.T.astype(np.float32, copy=False)
        if bias is not None:
            z += bias
        if softcap:
            z = np.tanh(z / softcap) * softcap
        z = z.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
        top = np.argpartition(-z, k - 1, axis=1)[:, :k]
        idx[a:a + chunk] = top
        lp[a:a + chunk] = np.take_along_axis(z, top, axis=1)
    return idx, lp
