"""The optimization loop both phases share: Adam, cosine learning rate, a seeded batch order.

The batch of step k depends only on (seed, k), and the optimizer state can be saved and
restored, so a resumed run takes exactly the steps an uninterrupted one would.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch


def batch_order(n_rows: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) row indices: seeded permutations of the rows, one after another."""
    need = steps * batch
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n_rows) for _ in range(-(-need // n_rows))])
    return order[:need].reshape(steps, batch)


def steps_for(tokens: int, batch: int, seqlen: int) -> int:
    return max(1, -(-tokens // (batch * seqlen)))


class Trainer:
    """Adam over parameter groups [(params, lr)], cosine decay to 10 % over `steps` steps."""

    def __init__(self, groups: list, steps: int, after_step=None, name: str = ""):
        self.name = name
        self.params = [p for ps, _ in groups for p in ps]
        self.opt = torch.optim.Adam([{"params": ps, "lr": lr, "base": lr} for ps, lr in groups if ps])
        self.steps, self.step_no = steps, 0
        self.after_step = after_step

    def step(self, loss):
        frac = self.step_no / max(self.steps, 1)
        for g in self.opt.param_groups:
            g["lr"] = g["base"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.after_step is not None:
            self.after_step()
        self.step_no += 1

    # -- resumable state: parameters, Adam's moments, the step number -------------------------
    def state(self) -> dict:
        out = {"step": np.asarray(self.step_no)}
        for i, p in enumerate(self.params):
            out[f"p{i}"] = p.detach().cpu().numpy()
            st = self.opt.state.get(p)
            if st:
                out[f"m{i}"] = st["exp_avg"].cpu().numpy()
                out[f"v{i}"] = st["exp_avg_sq"].cpu().numpy()
                out[f"t{i}"] = np.asarray(float(st["step"]))
        return out

    def restore(self, saved: dict):
        self.step_no = int(saved["step"])
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(torch.from_numpy(saved[f"p{i}"]))
                if f"m{i}" in saved:
                    self.opt.state[p] = {"exp_avg": torch.from_numpy(saved[f"m{i}"]).to(p.device),
                                         "exp_avg_sq": torch.from_numpy(saved[f"v{i}"]).to(p.device),
                                         "step": torch.tensor(float(saved[f"t{i}"]))}


class Meter:
    """Loss, tokens/s and ETA of a training run, a line on stderr every `every` seconds."""

    def __init__(self, task: str, steps: int, tokens_per_step: int, quiet: bool, every: float = 30.0):
        self.task, self.steps, self.tps, self.quiet, self.every = task, steps, tokens_per_step, quiet, every
        self.t0 = self.last = time.time()
        self.done = 0

    def tick(self, step: int, loss: float):
        self.done += 1
        now = time.time()
        if self.quiet or (now - self.last < self.every and step + 1 < self.steps):
            return
        self.last = now
        rate = self.done * self.tps / max(now - self.t0, 1e-9)
        eta = (self.steps - step - 1) * self.tps / max(rate, 1e-9)
        print(f"{self.task}: step {step + 1}/{self.steps} loss {loss:.5f} {rate:.0f} tok/s ETA {eta:.0f}s",
              file=sys.stderr, flush=True)
