"""Healing inside `convert()`: the teacher and block-wise steps around the recipe's steps, the
phase-1 file in the checkpoint folder, then the end-to-end phase into the output."""
from __future__ import annotations

import hashlib

import numpy as np

from .blockwise import BlockHeal
from .state import HealState
from .teacher import Teacher


class Healing:
    def __init__(self, opts, out, key: dict, quiet: bool = False, new_of_old: np.ndarray | None = None):
        """`new_of_old`: a trimmed vocabulary's id map (tokenizer_trim.TrimPlan), else None."""
        self.opts, self.out, self.quiet, self.new_of_old = opts, out, quiet, new_of_old
        self.state = HealState(out, key, quiet)
        self.teacher = Teacher(opts.top_k)
        self.e2e = "e2e" in opts.phases

    @staticmethod
    def key(header: dict, recipe_options: dict, ids: np.ndarray) -> dict:
        """What makes two runs the same run: source files, every option, the calibration tokens."""
        return {"source": header["provenance"]["source"], "options": recipe_options,
                "ids": hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()}

    def wrap(self, steps: list) -> list:
        """[teacher] + steps + [block-wise healing]: the teacher sees each block first."""
        out = [self.teacher] + steps
        if "block" in self.opts.phases:
            maps = [st for st in steps if hasattr(st, "to_student")]  # steps that change the residual basis
            out.append(BlockHeal(self.teacher, self.opts, self.state, maps, self.quiet))
        return out

    @property
    def stage1(self):
        """Where the stream writes: the checkpoint folder when an end-to-end phase follows."""
        return self.state.path("stage1.llmpack") if self.e2e else self.out

    def stream_done(self) -> bool:
        """A resumed run whose phase 1 finished: the stream need not run again."""
        return self.e2e and self.stage1.is_file() and self.state.path("teacher.npz").is_file()

    def after_stream(self):
        if self.e2e:
            idx, lp = self.teacher.topk
            if self.new_of_old is not None:
                idx, lp = trimmed_targets(idx, lp, self.new_of_old)
            self.state.save("teacher.npz", {"idx": idx, "lp": lp})
        else:
            self.state.remove()

    def finish(self, ids: np.ndarray, amend=None) -> dict | None:
        """Phase 2 into the output; the checkpoint folder goes once the output is in place."""
        if not self.e2e:
            return None
        from .e2e import heal_file

        t = self.state.load("teacher.npz")
        rec, _ = heal_file(self.stage1, self.out, ids, (t["idx"], t["lp"]), self.opts, self.state, amend=amend,
                        quiet=self.quiet)
        self.state.remove()
        return rec


WIDEST_SIG = -1.23457e-05  # a figure kept to 6 significant digits, at its widest in JSON


def record_bounds(opts, n_layers: int, seqlen: int, widest_seconds: float) -> list[dict]:
    """The recipe records healing adds (teacher, block-wise, end to end), each at its widest:
    what a size planner sets aside before any training has run."""
    from .e2e import record

    blocks = BlockHeal(None, opts, None)
    blocks.losses = [(WIDEST_SIG, WIDEST_SIG)] * n_layers
    blocks.tokens = [opts.tokens + opts.block_batch * seqlen] * n_layers  # whole steps: under one more batch
    blocks.seconds = widest_seconds
    recs = [{"step": Teacher.name, **Teacher(opts.top_k).options()}]
    if "block" in opts.phases:
        recs.append({"step": BlockHeal.name, **blocks.options()})
    if "e2e" in opts.phases:
        # trained tokens: whole steps of at most opts.batch sequences, so under one more batch than asked
        recs.append(record(opts.tokens + opts.batch * seqlen, WIDEST_SIG, WIDEST_SIG, widest_seconds))
    return recs


def trimmed_targets(idx: np.ndarray, lp: np.ndarray, new_of_old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k over the full vocabulary in a trimmed student's ids: a removed token's
    bin is emptied (log-probability MASKED, id 0) and its mass joins the tail, the one bin the
    student's other tokens share (e2e.topk_kl skips emptied bins)."""
    new = new_of_old[idx]
    gone = new < 0
    return np.where(gone, 0, new).astype(idx.dtype), np.where(gone, np.float32(MASKED), lp).astype(lp.dtype)


MASKED = -1e30  # an emptied top-k bin's log-probability: exp() is 0, and 0 x (MASKED - q) stays finite
