"""The layer stream: every compression step sees the model one block at a time.

    pre  (embedding)  ->  block 0  ->  block 1  ->  ...  ->  post (final norm, head)

Each step (converter/steps/*, converter/quantize/step.py) may change the tensors of the part in
hand, in order (slice, prune, quantize); calibration activations `x` (B, T, D) flow through the
already-compressed earlier blocks, so every step judges a block on the model as it will be
stored. Memory stays near one block plus the activations; each block is written and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmpack.formats.blocks import Block, ModelSpec, describe_block
from llmpack.runtime.progress import Progress

from .quantize.layers import LayerRunner, embed_tokens
from .quantize.options import is_quantized
from .quantize.store import store


@dataclass
class Stream:
    """What the steps share: the source, the evolving model description and the write plan."""

    source: object  # source.TensorSource
    model: dict  # the header's model description; steps edit it (norm kind, tied head, layers)
    spec: ModelSpec  # the source model's description: model-wide constants (eps, RoPE, scales)
    inv_freq: dict  # rope kind -> inverse frequencies
    ids: np.ndarray | None  # calibration tokens (B, T), None when no step calibrates
    types: dict  # canonical name -> storage plan entry (see quantize.options)
    opts: object  # quantize.options.QuantOptions
    float_dtype: str
    layers: list = field(default_factory=list)  # source block indices kept, in output order
    parts: dict = field(default_factory=dict)  # name -> (type, g, shape, parts, nnz) quantized by a step
    embed_rows: np.ndarray | None = None  # calibration rows of the stored embedding, if a step set them

    def block(self, j: int, t: dict, model: dict | None = None) -> Block:
        """Output block j over its current tensors `t` (short names); `model`: a description as
        it stood earlier in the recipe (a step may change the norm kind), else the current one."""
        prefix = f"layers.{j}."
        shapes = {prefix + k: v.shape for k, v in t.items()}
        return describe_block(model or self.model, j, shapes, t["attn.q.weight"].shape[1])

    def runner(self, j: int, t: dict, model: dict | None = None) -> LayerRunner:
        return LayerRunner(self.spec, self.block(j, t, model), t, self.inv_freq)

    def kind(self, name: str):
        """The storage plan of a tensor, also for tensors a step created (a sliced model's
        shortcuts and untied head take their neighbours' plan)."""
        if name in self.types:
            return self.types[name]
        if name == "head.weight":
            return self.types.get("embed.weight")
        if name.endswith(".shortcut.weight"):
            return self.types.get(name.replace("shortcut.weight", "attn.o.weight"))
        return None

    def write(self, writer, name: str, arr: np.ndarray):
        if name in self.parts:
            typ, g, shape, parts, nnz = self.parts.pop(name)
            writer.add(name, typ, shape, parts, group_size=g, nnz=nnz)
            return
        kind = self.kind(name)
        if is_quantized(kind) and arr.shape[1] < kind[1]:
            kind = None  # narrower than a group (a heavily sliced toy model): keep it float
        store(writer, name, arr, {name: kind} if kind is not None else {}, self.opts, self.float_dtype)


class Step:
    """A compression step. Each hook may edit the tensors it is given in place."""

    name = "step"
    recorded = True  # False for passengers that only measure (step_quality's probes)

    def options(self) -> dict:
        return {}

    def pre(self, s: Stream, pre: dict):
        pass

    def layer(self, s: Stream, j: int, t: dict, x):
        """Edit block j's tensors `t`; return the block's output for x if computed with the final
        tensors (saves a pass), else None."""
        return None

    def post(self, s: Stream, post: dict, x):
        pass


class WriteTimeStep(Step):
    """A step that happens as each tensor is written (RTN quantization): recorded, no block work."""

    def __init__(self, name: str, options: dict):
        self.name, self._options = name, options

    def options(self) -> dict:
        return self._options


def run(s: Stream, steps: list, writer, quiet: bool = False):
    """Stream the whole model through `steps` into `writer`."""
    sizes = s.source.weights()  # the ETA follows the work: steps weighted by their weights
    total = sizes["pre"] + sum(sizes["layers"][i] for i in s.layers) + sizes["post"]
    big = total >= 1e9
    progress = Progress("convert", total, quiet=quiet, unit="G weights" if big else "M weights",
                        scale=1e9 if big else 1e6)
    pre = s.source.load(s.source.pre)
    for step in steps:
        step.pre(s, pre)
    x = None
    if s.ids is not None:
        rows = s.embed_rows if s.embed_rows is not None else pre["embed.weight"][s.ids.ravel()]
        x = embed_tokens(s.spec, rows.reshape(s.ids.shape + (-1,)), pre.get("pos_embed.weight"), s.ids)
        s.embed_rows = None
    for name in sorted(pre):
        s.write(writer, name, pre.pop(name))
    progress.step("embedding", n=sizes["pre"])
    for j, i in enumerate(s.layers):
        t = s.source.layer(i)
        out = None
        for step in steps:
            out = step.layer(s, j, t, x)
        if x is not None:
            x = out if out is not None else s.runner(j, t).run(x)
        for short in sorted(t):
            s.write(writer, f"layers.{j}.{short}", t.pop(short))
        progress.step(f"layer {j}", n=sizes["layers"][i])
    post = s.source.load(s.source.post)
    for step in steps:
        step.post(s, post, x)
    for name in sorted(post):
        s.write(writer, name, post.pop(name))
    progress.step("head", n=sizes["post"])
    progress.done()

