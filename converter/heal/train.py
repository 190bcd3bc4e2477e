"""The optimization loop both phases share: Adam, cosine learning rate, a seeded batch order.

The batch of step k depends only on (seed, k), and the optimizer state can be saved and
restored, so a resumed run takes exactly the steps an uninterrupted one would. With
--heal-tokens auto, `split_rows` holds rows out and `UntilFlat` says when a phase stops.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch

from .options import HELD_OUT


def batch_order(n_rows: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) row indices: seeded permutations of the rows, one after another."""
    need = steps * batch
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n_rows) for _ in range(-(-need // n_rows))])
    return order[:need].reshape(steps, batch)


def split_rows(n_rows: int, opts) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): with --heal-tokens auto the last n_rows // HELD_OUT (at
    least one, never all) rows only measure when to stop; otherwise every row trains and the
    held-out set is empty."""
    held = min(max(1, n_rows // HELD_OUT), n_rows - 1) if opts.until_flat and n_rows > 1 else 0
    rows = np.arange(n_rows)
    return rows[: n_rows - held], rows[n_rows - held:]


def steps_for(tokens: int, batch: int, seqlen: int) -> int:
    return max(1, -(-tokens // (batch * seqlen)))


class Trainer:
    """Adam over parameter groups [(params, lr)], cosine decay to 10 % over `steps` steps."""

    def __init__(self, groups: list, steps: int, after_step=None, name: str = ""):
        self.name = name
        self.params = [p for ps, _ in groups for p in ps]
        self.opt = torch.optim.Adam([{"params": ps, "lr": lr, "base": lr} for ps, lr in groups if ps])
        self.steps, self.step_no = steps, 0
        self.last_loss = float("nan")
        self.after_step = after_step

    def step(self, loss):
        frac = self.step_no / max(self.steps, 1)
        for g in self.opt.param_groups:
            g["lr"] = g["base"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.last_loss = float(loss.item())
        self.opt.step()
        if self.after_step is not None:
            self.after_step()
        self.step_no += 1

    def snapshot(self) -> list:
        return [p.detach().clone() for p in self.params]

    def load(self, snap: list):
        with torch.no_grad():
            for p, v in zip(self.params, snap):
                p.copy_(v)

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


class UntilFlat:
    """--heal-tokens auto: the held-out error after each round of training; the best round's
    parameters kept; `done` once `patience` rounds in a row have each failed to cut the best
    error by `min_gain` (then the caller loads `best`). The error is measured before any
    training too, so a phase that cannot help stops with its parameters as they were.

    Patience 2, measured: with 1, Gemma-3-270M's blocks 0, 1 and 6 stopped after their first
    round (4 steps of Adam at the top of its learning rate left the held-out error where it
    was), where 16 steps had cut their error by 36-48 %."""

    def __init__(self, min_gain: float, trainer: Trainer, round_steps: int, patience: int = 2):
        self.min_gain, self.trainer, self.round_steps, self.patience = min_gain, trainer, round_steps, patience
        self.history: list[float] = []
        self.best = None  # the parameters at the lowest error so far

    @classmethod
    def of(cls, opts, trainer: Trainer, n_train: int, batch: int, n_held: int) -> "UntilFlat | None":
        """A phase's stopping rule with --heal-tokens auto (rows held out), else None; a round is
        one pass over the training rows."""
        return cls(opts.min_gain, trainer, -(-n_train // batch)) if n_held else None

    def round_ends(self) -> bool:
        """Whether the trainer's last step ended a round (or the budget)."""
        done = self.trainer.step_no
        return done % self.round_steps == 0 or done == self.trainer.steps

    def _replay(self) -> tuple[float, int]:
        """(best error, rounds since the last that gained) of the history so far."""
        best, since = float("inf"), 0
        for e in self.history:
            since = 0 if e < best * (1 - self.min_gain) else since + 1
            best = min(best, e)
        return best, since

    @property
    def best_error(self) -> float:
        return self._replay()[0]

    @property
    def done(self) -> bool:
        return self._replay()[1] >= self.patience

    def update(self, error: float):
        if error < self.best_error:
            self.best = self.trainer.snapshot()
        self.history.append(float(error))

    def finish(self):
        """The best round's parameters into the trainer's."""
        if self.best is not None:
            self.trainer.load(self.best)

    def state(self) -> dict:
        out = {"flat_history": np.asarray(self.history, np.float64)}
        if self.best is not None:
            out.update({f"best{i}": v.cpu().numpy() for i, v in enumerate(self.best)})
        return out

    def restore(self, saved: dict):
        self.history = [float(v) for v in saved.get("flat_history", [])]
        if "best0" in saved:
            dev = self.trainer.params[0].device
            self.best = [torch.from_numpy(saved[f"best{i}"]).to(dev) for i in range(len(self.trainer.params))]


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
