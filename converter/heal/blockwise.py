"""Phase 1: each block, as it will be stored, trained to reproduce the original block.

A step of the layer stream, placed after the compression steps. For block j it has the
student's input x (from the already-healed earlier blocks), the block's tensors as the
earlier steps left them (quantized parts in Stream.parts) and the original model's output of
the same block on the original's own activations (teacher.py; mapped into a sliced basis by
the slicing step). It trains the quantization scales, norms, biases and float matrices (and,
when asked, the rounding of the codes) to minimize the relative squared error
||y - y*||^2 / ||y*||^2 (EfficientQAT's Block-AP, with the original's activations as targets
so a block also learns to undo the error of the blocks before it). Memory: one block, its
Adam state and the calibration activations.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from ..stream import Step, Stream
from . import torch_block
from .params import Params, dequantized
from .train import Meter, Trainer, UntilFlat, batch_order, split_rows, steps_for


def block_params(s: Stream, j: int, t: dict, device, latent: bool = False) -> tuple[Params, object]:
    """Trainable parameters of block j (canonical names) and its description."""
    blk = s.block(j, t)
    prefix = blk.prefix
    p = Params(device)
    for short, arr in t.items():
        name = prefix + short
        if name in s.parts:
            typ, g, shape, parts, nnz = s.parts[name]
            p.quantized(name, typ, shape, g, parts, nnz, latent)
        elif arr.ndim == 2:
            kind = s.kind(name)  # a float type of the plan (--keep), else the file's float dtype
            p.float_matrix(name, arr, kind if isinstance(kind, str) else s.float_dtype)
        else:
            p.vector(name, arr)
    return p, blk


EVAL_ROWS = 4  # sequences per forward when the error is measured (no gradient)


def _sig(x) -> float:
    return float(f"{float(x):.6g}")


def relative_error(y, target):
    return ((y - target) ** 2).mean() / (target ** 2).mean()


class BlockHeal(Step):
    name = "heal_blocks"

    def __init__(self, teacher, opts, state, maps=(), quiet: bool = False):
        self.teacher, self.opts, self.state, self.maps, self.quiet = teacher, opts, state, list(maps), quiet
        self.losses = []  # per block: (before, after)
        self.tokens = []  # per block: tokens trained (--heal-tokens auto stops each block on its own)
        self.seconds = 0.0

    def options(self) -> dict:
        before = [b for b, _ in self.losses]
        after = [a for _, a in self.losses]
        return {"tokens_per_block": self.tokens if self.opts.until_flat else self.opts.tokens,
                "block_error": {"before": _sig(np.mean(before)) if before else None,
                                "after": _sig(np.mean(after)) if after else None},
                "per_block_error": [[_sig(b), _sig(a)] for b, a in self.losses],
                "seconds": round(self.seconds, 1)}

    def layer(self, s: Stream, j: int, t: dict, x):
        target = self.teacher.target
        for m in self.maps:
            target = m.to_student(target)
        saved = self.state.load(f"block-{j:03d}.npz")
        if saved is None:
            t0 = time.time()
            saved = self._train(s, j, t, x, target)
            self.state.save(f"block-{j:03d}.npz", saved)
            self.seconds += time.time() - t0
        self._restore(s, j, t, saved)
        return None

    def _train(self, s: Stream, j: int, t: dict, x: np.ndarray, target: np.ndarray) -> dict:
        o = self.opts
        dev = torch.device(o.device)
        p, blk = block_params(s, j, t, dev, latent=o.lr_weight > 0)
        fwd = torch_block.TorchBlock(s.spec, blk, p)
        B, T = x.shape[:2]
        tables = torch_block.rope(s.spec, s.inv_freq, T, dev)
        X, Y = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(target))

        def error(rows):
            return relative_error(fwd(X[rows].to(dev), tables), Y[rows].to(dev))

        def mean_error(rows):
            with torch.no_grad():
                return float(np.mean([error(rows[a:a + EVAL_ROWS]).item() for a in range(0, len(rows), EVAL_ROWS)]))

        train, held = split_rows(B, o)
        batch = min(o.block_batch, len(train))
        steps = steps_for(o.tokens, batch, T)
        before = mean_error(np.arange(B))
        trainer = Trainer(p.groups(o.lr_weight, o.lr_scale, o.lr_float, o.lr_matrix), steps, after_step=p.clamp)
        flat = UntilFlat.of(o, trainer, len(train), batch, len(held))
        if flat is not None:
            flat.update(mean_error(held))
        meter = Meter(f"heal block {j}", steps, batch * T, self.quiet)
        for k, rows in enumerate(train[batch_order(len(train), batch, steps, o.seed + j)]):
            trainer.step(error(rows))
            meter.tick(k, trainer.last_loss)
            if flat is not None and flat.round_ends():
                flat.update(mean_error(held))
                if flat.done:
                    break
        if flat is not None:
            flat.finish()
        after = mean_error(np.arange(B))
        self.losses.append((before, after))
        done = trainer.step_no
        self.tokens.append(tokens := done * batch * T)
        if not self.quiet:
            until = f", held-out {flat.history[0]:.5f} -> {flat.best_error:.5f}" if flat is not None else ""
            print(f"heal block {j}: error {before:.5f} -> {after:.5f} ({done} steps{until})", file=sys.stderr,
                  flush=True)
        out = {"loss": np.asarray([before, after]), "tokens": np.asarray(tokens)}
        for name in list(p.mods) + list(p.vecs):
            kind, *rest = p.stored(name)
            if kind == "f":
                out["f/" + name] = rest[0]
            else:
                typ, shape, g, parts, nnz = rest
                out["t/" + name] = np.asarray(typ)
                out["n/" + name] = np.asarray([g, -1 if nnz is None else nnz, *shape])
                for k, v in parts.items():
                    out[f"p/{name}/{k}"] = v
        return out

    def _restore(self, s: Stream, j: int, t: dict, saved: dict):
        prefix = f"layers.{j}."
        if "loss" in saved and len(self.losses) <= j:
            self.losses.append(tuple(float(v) for v in saved["loss"]))
            self.tokens.append(int(saved["tokens"]))
        for key, v in saved.items():
            if key.startswith("f/"):
                t[key[2 + len(prefix):]] = np.asarray(v, np.float32)
            elif key.startswith("t/"):
                name = key[2:]
                typ = str(v)
                g, nnz, *shape = (int(a) for a in saved["n/" + name])
                nnz = None if nnz < 0 else nnz
                parts = {k.split("/")[-1]: a for k, a in saved.items() if k.startswith(f"p/{name}/")}
                s.parts[name] = (typ, g, tuple(shape), parts, nnz)
                t[name[len(prefix):]] = dequantized(typ, tuple(shape), g, parts, nnz)
