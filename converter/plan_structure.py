"""The planner's structural side: dropping whole blocks and pruning MLP neurons, weighed against bits.

A structure removes bytes before quantization has to: the planner (plan.py) lays out every
candidate below beside every vocabulary and head choice and keeps the one whose predicted damage
is least at the target size. The candidates, measured once on the float model over the
calibration slice (steps/layer_drop.FloatModel, never evaluation text) and cached beside
--sensitivity FILE as FILE.structure.json:

- drop k blocks, k = 1 .. max(1, n_layers // 8): layer_drop's iterative choice (block influence,
  then the measured KL of each of the three likeliest); the damage of k is the KL to the original
  after k rounds, so k + 1 extends the choice of k;
- prune the same fraction f of every block's MLP neurons (steps/pruning.prune_mlp: importance
  |W_down| * ||u||, mean contribution compensated in the down projection's bias), f in
  MLP_FRACTIONS; the damage is the KL of the model pruned that way, block after block.

A candidate (k, f) predicts drop[k] + prune[f] (the two measured apart and added) plus the
quantization damages of what remains, a pruned matrix's scaled by the share of it kept. On the
off-grid Qwen2.5-Coder-0.5B (1,024 tokens): one, two, three blocks cost KL 0.088, 0.300, 0.367;
10 % / 25 % of the MLP neurons 0.039 / 0.133. Above ~240 MB the planner keeps the whole model; at
10x it prunes 25 % and spends the bytes on bits (measured bits/byte 1.263x against 1.300x without;
the additive model underrates the KLD there, 0.38 predicted against 0.70: docs/plan.md). Equal
damage goes to the smaller file, so an identity block or dead neurons are always removed.

Not candidates: slicing and 2:4 / unstructured sparsity (on that model 10 % slicing cost KLD 1.08
and 2:4 + q4 1.06, an order of magnitude more per byte than the above), head pruning, and the
healing budget (what --heal recovers is not predicted; it trains the planned file).
Memory: the float model, 4 bytes a weight; skipped, with a note, when that would take more than
half of the memory available (a 7B model). Off unless --search-structure is given (measured in
docs/plan.md: better at 10x on Qwen, worse at 6x and 8x and on Gemma-3-270M at 10x: the bits'
predicted damages are conservative under GPTQ, the structures' are not, so the comparison
favours structure).
"""
from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import json_cache

MLP_FRACTIONS = (0.1, 0.25)
FORMAT = 1  # of the cache file
_LAYER = re.compile(r"layers\.(\d+)\.(.*)")
_MLP_ROWS = ("mlp.gate.weight", "mlp.gate.bias", "mlp.up.weight", "mlp.up.bias")  # one row per neuron


def max_drop(n_layers: int) -> int:
    return max(1, n_layers // 8) if n_layers > 1 else 0


@dataclass(frozen=True)
class Structure:
    """One structural candidate: the source blocks dropped (with the KL after each round) and
    the fraction of MLP neurons pruned in every kept block; `damage` in nats of KL per token."""

    dropped: tuple = ()  # ((source index, KL after this round), ...)
    mlp: float = 0.0
    damage: float = 0.0

    @property
    def none(self) -> bool:
        return not self.dropped and not self.mlp

    def label(self) -> str:
        parts = ([f"-{len(self.dropped)}L"] if self.dropped else []) + ([f"mlp-{self.mlp:.0%}"] if self.mlp else [])
        return ",".join(parts) or "whole"

    def record(self) -> dict:
        return {"dropped": [i for i, _ in self.dropped], "mlp": self.mlp, "damage": round(self.damage, 6)}

    def kept(self, n_layers: int) -> list:
        gone = {i for i, _ in self.dropped}
        return [i for i in range(n_layers) if i not in gone]

    def renamed(self, d: dict, n_layers: int) -> dict:
        """A name-keyed dict with the dropped blocks' entries gone and the kept ones renumbered
        as the stream writes them (kept block i becomes block j, its place among the kept)."""
        out_of = {i: j for j, i in enumerate(self.kept(n_layers))}
        out = {}
        for name, v in d.items():
            m = _LAYER.fullmatch(name)
            if m is None:
                out[name] = v
            elif int(m.group(1)) in out_of:
                out[f"layers.{out_of[int(m.group(1))]}.{m.group(2)}"] = v
        return out

    def pruned(self, width: int) -> int:
        """Neurons a block of `width` keeps (as steps/pruning.prune_mlp removes them)."""
        from .steps.pruning import neurons_removed

        return width - neurons_removed(width, self.mlp)

    def shapes(self, shapes: dict, n_layers: int) -> dict:
        """Tensor shapes of the file after this structure (output numbering): pruned MLP
        matrices narrower, the down projection's compensating bias added where pruning adds it."""
        out = self.renamed(shapes, n_layers)
        if not self.mlp:
            return out
        for j in range(n_layers - len(self.dropped)):
            p = f"layers.{j}."
            width = out[p + "mlp.up.weight"][0]
            keep = self.pruned(width)
            if keep == width:
                continue
            for short in _MLP_ROWS:
                if p + short in out:
                    out[p + short] = (keep,) + tuple(out[p + short][1:])
            out[p + "mlp.down.weight"] = (out[p + "mlp.down.weight"][0], keep)
            out.setdefault(p + "mlp.down.bias", (out[p + "mlp.down.weight"][0],))
        return out

    def removed_neurons(self, shapes: dict, n_layers: int) -> int:
        return sum(shapes[f"layers.{i}.mlp.up.weight"][0] - self.pruned(shapes[f"layers.{i}.mlp.up.weight"][0])
                   for i in self.kept(n_layers))


def candidates(measured: dict) -> list[Structure]:
    """Every (drop k, prune f) pair of a measurement, the whole model first."""
    drops = [()] + [tuple(tuple(d) for d in measured["dropped"][:k]) for k in range(1, len(measured["dropped"]) + 1)]
    prunes = [(0.0, 0.0)] + [(float(f), float(d)) for f, d in measured["mlp"]]
    return [Structure(drop, f, (drop[-1][1] if drop else 0.0) + d) for drop in drops for f, d in prunes]


def measure(r, s, recipe, quiet: bool = False) -> list[Structure]:
    """The candidates for this checkpoint and calibration (cached beside --sensitivity FILE);
    [Structure()] (the whole model only) when not searched."""
    n = r.model["n_layers"]
    if not recipe.search_structure or max_drop(n) == 0 or s.ids is None:
        return [Structure()]
    if not all(f"layers.{i}.mlp.up.weight" in r.shapes and f"layers.{i}.mlp.down.weight" in r.shapes
               for i in range(n)):
        return [Structure()]
    sizes = s.source.weights()
    need = 4 * (sizes["pre"] + sum(sizes["layers"]) + sizes["post"])
    from llmpack.runtime.numpy_backend import available_memory

    avail = available_memory()
    if avail is not None and need > avail // 2:
        if not quiet:
            print(f"plan: structure not searched: the float model ({need / 1e9:.1f} GB) would take more than half "
                  f"of the memory available ({avail / 1e9:.1f} GB); give --drop-layers/--prune-mlp with --bits "
                  f"instead", file=sys.stderr)
        return [Structure()]
    path = cache_path(recipe.sensitivity_file)
    key = _key(r, s, n)
    found = json_cache.load(path, key)
    if found is not None:
        if not quiet:
            print(f"plan: reused the structure measurement in {path}", file=sys.stderr)
        return candidates(found)
    found = _measure(s, n, quiet)
    json_cache.store(path, key, found)
    return candidates(found)


def _measure(s, n: int, quiet: bool) -> dict:
    from .steps import layer_drop
    from .steps.pruning import prune_mlp

    m = layer_drop.FloatModel(s, layer_drop.calibration_slice(s.ids))
    _, dropped = layer_drop.choose(s, max_drop(n), quiet=quiet, m=m)
    ref, _ = m.reference()
    mlp = []
    for f in MLP_FRACTIONS:
        x = m.x0
        for i in range(n):
            t = dict(m.blocks[i])
            prune_mlp(s, i, t, x, f)
            x = s.runner(i, t).run(x)
        mlp.append([f, round(m.kld(ref, x), 6)])
        if not quiet:
            print(f"plan: pruning {f:.0%} of the MLP neurons costs KL {mlp[-1][1]:.4f}", file=sys.stderr)
    return {"dropped": [list(d) for d in dropped], "mlp": mlp}


def cache_path(sensitivity_file) -> Path | None:
    """Kept beside --sensitivity FILE (FILE.structure.json)."""
    return None if sensitivity_file is None else Path(str(sensitivity_file) + ".structure.json")


def _key(r, s, n: int) -> dict:
    from .steps import layer_drop

    ids = np.ascontiguousarray(layer_drop.calibration_slice(s.ids), np.int64)
    return {"format": FORMAT, "source": r.ckpt.sha256_files(), "ids": hashlib.sha256(ids.tobytes()).hexdigest(),
            "drop": max_drop(n), "mlp": list(MLP_FRACTIONS)}


def scaled_damages(structure: Structure, damages: dict, src_shapes: dict, out_shapes: dict, n_layers: int,
                   options) -> dict:
    """Quantization damages of the file's matrices under `structure` (output numbering): a
    pruned matrix's scaled by the share of its weights kept, restricted to the options its new
    shape allows (`options(shape)`)."""
    src_of = structure.renamed({k: k for k in damages}, n_layers)  # output name -> source name
    out = {}
    for name, src in src_of.items():
        share = math.prod(out_shapes[name]) / math.prod(src_shapes[src])
        allowed = set(options(out_shapes[name]))
        out[name] = {c: d * share for c, d in damages[src].items() if c in allowed}
    return out
