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


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class _Model:
    """The float model over the calibration slice, runnable from any block with any subset."""

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

    def run_from(self, x, kept: list, start: int) -> tuple[np.ndarray, list]:
        """Run blocks kept[start:] on x; returns (log-probabilities, inputs of each block run)."""
        inputs = []
        for k in range(start, len(kept)):
            inputs.append(x)
            i = kept[k]
            x = _runner(self.s, i, self.blocks[i]).run(x)
        inputs.append(x)
        h = final_hidden(self.s.model["norm"], self.s.spec.norm_eps, x, self.post)
        logits = h @ self.head.T
        if self.head_bias is not None:
            logits = logits + self.head_bias
        cap = self.s.spec.final_softcap
        if cap:
            logits = np.tanh(logits / cap) * cap
        return _log_softmax(logits.reshape(-1, logits.shape[-1]).astype(np.float64)), inputs


def _runner(s: Stream, i: int, t: dict):
    shapes = {f"layers.{i}.{k}": v.shape for k, v in t.items()}
    return LayerRunner(s.spec, describe_block(s.model, i, shapes, t["attn.q.weight"].shape[1]), t, s.inv_freq)


def kld(ref_logp: np.ndarray, logp: np.ndarray) -> float:
    return float((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1).mean())


def block_influence(inputs: list) -> np.ndarray:
    """1 - mean cosine(x_in, x_out) per block, from the list of block inputs (+ final output)."""
    out = []
    for a, b in zip(inputs, inputs[1:]):
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        cos = (a2 * b2).sum(-1) / (np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1) + 1e-12)
        out.append(1.0 - float(cos.mean()))
    return np.array(out)


def choose(s: Stream, n_drop: int, quiet: bool = False) -> tuple[list, list]:
    """(kept source block indices, [(dropped index, measured KLD)]) after n_drop rounds."""
    ids = s.ids
    rows = max(1, min(len(ids), MAX_TOKENS // ids.shape[1]))
    m = _Model(s, ids[:rows, : min(ids.shape[1], MAX_TOKENS)])
    kept = list(s.layers)
    ref, inputs = m.run_from(m.x0, kept, 0)
    progress = Progress("drop layers", n_drop, quiet=quiet)
    dropped = []
    for _ in range(n_drop):
        bi = block_influence(inputs)
        best = None
        for k in np.argsort(bi, kind="stable")[:CANDIDATES]:
            trial = kept[:k] + kept[k + 1:]
            logp, _ = m.run_from(inputs[k], trial, int(k))
            d = kld(ref, logp)
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
    s.layers = kept
    s.model["layers"] = [s.model["layers"][i] for i in kept]
    s.model["n_layers"] = len(kept)
    return [list(d) for d in dropped]
