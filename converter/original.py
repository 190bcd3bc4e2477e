"""The original model, streamed beside the compressed one.

Placed first among the stream's steps, it sees every block's tensors before any step changes
them and runs the original block on the original model's own activations (never the compressed
model's). Blocks the layer-drop step removed still run here: they are read from the source.
Healing's teacher (heal/teacher.py) keeps each block's output as a target; the per-step quality
measurement (step_quality.py) keeps the final hidden states as its reference.
"""
from __future__ import annotations

import numpy as np

from .quantize.layers import LayerRunner, embed_tokens, final_hidden
from .stream import Step, Stream


class OriginalModel(Step):
    """The source model on tokens `ids` (B, T), or on the calibration tokens when None."""

    name = "original"

    def __init__(self, ids: np.ndarray | None = None):
        self.ids = ids
        self.x = None  # the original model's activations (B, T, D) entering block `self.next`
        self.next = 0  # the next source block to run
        self.embed = None  # the original embedding, kept for a tied head

    def pre(self, s: Stream, pre: dict):
        ids = self.ids if self.ids is not None else s.ids
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
        return None

    def finish(self, s: Stream, post: dict) -> tuple[np.ndarray, np.ndarray]:
        """After the last kept block: run the dropped tail; (final hidden states (B, T, D), head)."""
        for k in range(self.next, len(s.spec.blocks)):
            self._run(s, k, s.source.layer(k))
        h = final_hidden(s.spec.final_norm.kind, s.spec.norm_eps, self.x, post)
        head = self.embed if s.spec.tied else post["head.weight"]
        self.x = self.embed = None
        return h, head


def head_logits(h: np.ndarray, head: np.ndarray, bias, softcap) -> np.ndarray:
    """Logits of hidden states h (N, D) through a head (V, D), its bias and the soft cap."""
    z = h.astype(np.float32) @ head.T.astype(np.float32, copy=False)
    if bias is not None:
        z += bias
    return np.tanh(z / softcap) * softcap if softcap else z
