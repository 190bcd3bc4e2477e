"""Dropping whole blocks, chosen by the measured damage of dropping each, iteratively.

Before the stream runs: the model is run on a slice of the calibration batch (float, numpy);
each round, the blocks whose output is most like their input (ShortGPT's block influence,
1 - cos(x_in, x_out), Men et al., 2024) are the candidates, the KL divergence of the model's
next-token distribution with each candidate dropped is measured against the original model,
and the least damaging one goes. The next round re-runs the model without it, so each choice
is judged on the already-pruned model. Holds every block's float weights (the 0.5B model:
2.5 GB); the dropped blocks are then skipped by the stream and the kept ones renumbered.
"""
from __future__ import annotations

import numpy as np

from llmpack.formats.blocks import describe_block
from llmpack.runtime.progress import Progress

from ..quantize.layers import LayerRunner, embed_tokens, final_hidden
from ..stream import Stream

CANDIDATES = 3  # blocks measured per round (lowest block influence first)
MAX_TOKENS = 1024  # calibration tokens used for the choice
KL_CHUNK = 128  # tokens whose full next-token distributions are held at once


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class FloatModel:
    """The float model over the calibration slice, runnable from any block with any subset
    (also the structure planner's, converter/plan_structure.py)."""

    def __init__(self, s: Stream, ids):
        self.s, self.ids = s, ids
        pre = s.source.load(s.source.pre)
        self.x0 = embed_tokens(s.spec, pre["embed.weight"][ids.ravel()].reshape(ids.shape + (-1,)),
                               pre.get("pos_embed.weight"), ids)
        post = s.source.load(s.source.post)
        self.head = post.get("head.weight", pre["embed.weight"])
        self.head_bias = post.get("head.bias")
        self.post = post
        self.blocks = {i: s.source.layer(i) for i in s.layers}
        self._reference = None

    def reference(self) -> tuple[np.ndarray, list]:
        """run_from(x0, every block, 0) of the whole model, computed once (the layer-drop rounds
        and the structure planner's pruning measurements compare against the same output)."""
        if self._reference is None:
            self._reference = self.run_from(self.x0, list(self.s.layers), 0)
        return self._reference

    def run_from(self, x, kept: list, start: int) -> tuple[np.ndarray, list]:
        """Run blocks kept[start:] on x; returns (the last block's output, inputs of each block run)."""
        inputs = []
        for k in range(start, len(kept)):
            inputs.append(x)
            i = kept[k]
            x = _runner(self.s, i, self.blocks[i]).run(x)
        inputs.append(x)
        return x, inputs

    def log_probs(self, x) -> np.ndarray:
        """Next-token log-probabilities (tokens, V), float64, of last-block outputs x (..., D)."""
        h = final_hidden(self.s.model["norm"], self.s.spec.norm_eps, x.reshape(-1, x.shape[-1]), self.post)
        logits = h @ self.head.T
        if self.head_bias is not None:
            logits = logits + self.head_bias
        cap = self.s.spec.final_softcap
        if cap:
            logits = np.tanh(logits / cap) * cap
        return _log_softmax(logits.astype(np.float64))

    def kld(self, ref, x, chunk: int = KL_CHUNK) -> float:
        """Mean KL(original || model) per token between two sets of last-block outputs, `chunk`
        tokens at a time: the full log-probabilities of 1024 tokens over Qwen's 151,936 tokens
        would be 1.2 GB each in float64 (the planner peaked at 8.0 GB holding three)."""
        ref, x = ref.reshape(-1, ref.shape[-1]), x.reshape(-1, x.shape[-1])
        total = 0.0
        for a in range(0, len(ref), chunk):
            r = self.log_probs(ref[a:a + chunk])
            total += float((np.exp(r) * (r - self.log_probs(x[a:a + chunk]))).sum())
        return total / len(ref)


def _runner(s: Stream, i: int, t: dict):
    shapes = {f"layers.{i}.{k}": v.shape for k, v in t.items()}
    return LayerRunner(s.spec, describe_block(s.model, i, shapes, t["attn.q.weight"].shape[1]), t, s.inv_freq)


def block_influence(inputs: list) -> np.ndarray:
    """1 - mean cosine(x_in, x_out) per block, from the list of block inputs (+ final output)."""
    out = []
    for a, b in zip(inputs, inputs[1:]):
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        cos = (a2 * b2).sum(-1) / (np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1) + 1e-12)
        out.append(1.0 - float(cos.mean()))
    return np.array(out)


def calibration_slice(ids: np.ndarray) -> np.ndarray:
    """The calibration rows the choice is measured on (MAX_TOKENS of them at most)."""
    rows = max(1, min(len(ids), MAX_TOKENS // ids.shape[1]))
    return ids[:rows, : min(ids.shape[1], MAX_TOKENS)]


def choose(s: Stream, n_drop: int, quiet: bool = False, m: FloatModel | None = None) -> tuple[list, list]:
    """(kept source block indices, [(dropped index, measured KLD)]) after n_drop rounds; `m` a
    FloatModel already loaded on calibration_slice(s.ids), else one is loaded."""
    m = m or FloatModel(s, calibration_slice(s.ids))
    kept = list(s.layers)
    ref, inputs = m.reference()
    progress = Progress("drop layers", n_drop, quiet=quiet)
    dropped = []
    for _ in range(n_drop):
        bi = block_influence(inputs)
        best = None
        for k in np.argsort(bi, kind="stable")[:CANDIDATES]:
            trial = kept[:k] + kept[k + 1:]
            out, _ = m.run_from(inputs[k], trial, int(k))
            d = m.kld(ref, out)
            if best is None or d < best[0]:
                best = (d, int(k))
        d, k = best
        dropped.append((kept[k], round(d, 6)))
        kept = kept[:k] + kept[k + 1:]
        _, tail = m.run_from(inputs[k], kept, k)
        inputs = inputs[:k] + tail
        progress.step(f"layer {dropped[-1][0]} (KLD {d:.4f})")
    progress.done()
    return kept, dropped


def drop_layers(s: Stream, n_drop: int, quiet: bool = False) -> list:
    """Choose and apply: the stream then skips the dropped blocks; returns [[index, KLD], ...]."""
    kept, dropped = choose(s, n_drop, quiet=quiet)
    apply(s, kept)
    return [list(d) for d in dropped]


def record(dropped: list, seconds: float) -> dict:
    """The recipe's record of the step: [[source index, KL after that round], ...] and its time."""
    return {"step": "drop_layers", "count": len(dropped), "dropped": [list(d) for d in dropped], "seconds": seconds}


def apply(s: Stream, kept: list):
    """Keep only the source blocks `kept` (in order): the stream skips the others, the model
    description loses their entries."""
    s.layers = list(kept)
    s.model["layers"] = [s.model["layers"][i] for i in kept]
    s.model["n_layers"] = len(kept)
