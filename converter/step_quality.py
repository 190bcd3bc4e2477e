"""The quality after each step of a recipe (`convert --eval`), measured in the conversion's one pass.

A recipe of several steps (drop layers, slice, prune, quantize) streams each block through all
of them in turn, so no file of "the model after step k" ever exists. Instead, probes ride along
in the stream: the original model (original.py) and, after every step but the last, a probe
that runs the evaluation windows through each block exactly as that step left it. At the end
each probe's next-token distribution is compared with the original's on the same windows (KLD,
top-1, perplexity ratio: runtime/quality.Accumulator), and the figures go into that step's
record. The last step's figures are the finished file's own measurement (convert.py), taken
against transformers' logits like every `--eval`.

What "the model after step k" means here: blocks as step k left them, each calibrated on
activations that came through the fully compressed earlier blocks (the recipe's own order);
the reference is the source run by the converter's numpy blocks in float32 (equal to
transformers' logits to ~1e-5, tests/test_parity.py).

Cost: one forward pass of the evaluation windows per probe plus one for the original, and their
logits at the end (on the off-grid Qwen 0.5B, 16 x 512 tokens: about two minutes a probe on 2
cores). Memory: each probe's activations (windows x ctx x hidden floats) and the head matrix it
read (a new one only where slicing rotated it).
"""
from __future__ import annotations

import numpy as np

from llmpack.runtime.progress import Progress
from llmpack.runtime.quality import Accumulator

from .original import OriginalModel, head_logits
from .quantize.layers import embed_tokens, final_hidden
from .stream import Step, Stream

MEASURED_AFTER = ("drop_layers", "slice", "prune", "tie_head")  # steps whose state a probe can run (float tensors)


class Probe(Step):
    """The model as the steps before this one left it, on the evaluation windows."""

    name = "probe"
    recorded = False

    def __init__(self, after: str, ids: np.ndarray):
        self.after, self.ids = after, ids
        self.model = None  # the model description as it stood here (slicing turns LayerNorm into RMSNorm)
        self.x = self.embed = None
        self.h = self.head = self.bias = None

    def pre(self, s: Stream, pre: dict):
        self.model = dict(s.model)
        rows = pre["embed.weight"][self.ids.ravel()].reshape(self.ids.shape + (-1,))
        self.x = embed_tokens(s.spec, rows, pre.get("pos_embed.weight"), self.ids)
        self.embed = pre["embed.weight"]  # the head when tied (steps replace, never edit, the array)

    def layer(self, s: Stream, j: int, t: dict, x):
        self.x = s.runner(j, t, self.model).run(self.x)
        return None

    def post(self, s: Stream, post: dict, x):
        self.h = final_hidden(self.model["norm"], s.spec.norm_eps, self.x, post)
        self.head = post["head.weight"] if "head.weight" in post else self.embed  # slicing unties a tied head
        self.bias = post.get("head.bias")
        if "head_proj.weight" in post:  # tie_head: the embedding read through a fitted map
            self.h = self.h @ post["head_proj.weight"].T
        self.x = self.embed = None


class Reference(OriginalModel):
    name = "reference"
    recorded = False

    def __init__(self, ids: np.ndarray):
        super().__init__(ids)
        self.h = self.head = self.bias = None

    def post(self, s: Stream, post: dict, x):
        self.h, self.head = self.finish(s, post)
        self.bias = post.get("head.bias")


class StepQuality:
    """Probes for a recipe's steps and the measurement that fills the steps' records."""

    def __init__(self, windows: list[np.ndarray], text_name: str, quiet: bool = False):
        self.ids = np.stack(windows)
        self.text_name, self.quiet = text_name, quiet
        self.reference = Reference(self.ids)
        self.probes: list[Probe] = []

    def insert(self, steps: list, done: list) -> list:
        """`steps` with the reference first and a probe after every measurable step that is not
        the recipe's last (the finished file measures that one). `done`: records of steps run
        before the stream (layer dropping)."""
        order = [r["step"] for r in done if r.get("step") in MEASURED_AFTER]
        rest = [st for st in steps if st.name not in ("teacher", "heal_blocks")]
        out = []
        if order and rest:  # layer dropping happened before the stream: probe its result first
            out.append(self._probe(order[-1]))
        for st in steps:
            out.append(st)
            if st.name in MEASURED_AFTER and st is not rest[-1]:
                out.append(self._probe(st.name))
        return [self.reference] + out if self.probes else steps

    def _probe(self, after: str) -> Probe:
        self.probes.append(Probe(after, self.ids))
        return self.probes[-1]

    def attach(self, s: Stream, records: list):
        """Compare every probe with the original; each figure goes to the last record of its step."""
        if not self.probes:
            return
        accs = [Accumulator() for _ in self.probes]
        ref = self.reference
        progress = Progress("eval after each step", len(self.ids), quiet=self.quiet)
        for w, ids in enumerate(self.ids):
            r = head_logits(ref.h[w], ref.head, ref.bias, s.spec.final_softcap)
            for p, acc in zip(self.probes, accs):
                acc.add(r, head_logits(p.h[w], p.head, p.bias, s.spec.final_softcap), ids)
            progress.step(f"window {w + 1}")
        progress.done()
        for p, acc in zip(self.probes, accs):
            rep = acc.report()
            record = [r for r in records if r.get("step") == p.after][-1]
            record["quality"] = summary(rep, windows=len(self.ids), ctx=self.ids.shape[1], text=self.text_name,
                                        reference="source (converter's float32 blocks)")
        self.probes = []
        self.reference = None


def summary(report: dict, **extra) -> dict:
    """The figures a recipe step records (the full report lives in the header's `quality`)."""
    out = {k: float(f"{report[k]:.6g}") for k in ("kld", "top1", "ppl_ratio", "bpb_ratio")
           if report.get(k) is not None}
    return {**out, **extra}
