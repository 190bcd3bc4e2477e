"""Phase 2: the whole file's scales and norms trained against the original's next tokens.

File to file: the codes and zero points of every quantized tensor stay as stored, the f16
scales of every block linear, the norms and the biases learn (EfficientQAT's E2E-QP), so the
output has exactly the input's layout and size. The loss is the KL divergence from the
original's next-token distribution, kept by the teacher as the top-k log-probabilities of
each calibration token plus the tail's mass: KL over k + 1 bins, never a full-vocabulary
target. The embedding and the head stay frozen (the head's gradient alone would cost as much
as the rest of the model). The head and loss run on chunks of tokens under activation
checkpointing, so the (tokens x vocabulary) logits never exist for a whole batch.
"""
from __future__ import annotations

import gc
import sys
import time

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from llmpack.formats.blocks import describe_model
from llmpack.formats.reader import Pack
from llmpack.formats.spec import STORAGE_TYPES
from llmpack.formats.writer import PackWriter
from llmpack.runtime.numpy_block import embed

from . import torch_block
from .params import Params
from .train import Meter, Trainer, UntilFlat, batch_order, split_rows, steps_for

CHUNK = 512  # tokens per head-and-loss chunk: 512 x 152k logits = 311 MB


def topk_kl(z, idx, lp):
    """Mean KL(teacher || student) over tokens; z (N, V) student logits, teacher top-k idx/lp (N, k)."""
    logq = torch.log_softmax(z.float(), dim=-1)
    q_top = logq.gather(1, idx)
    p_top = lp.exp()
    kept = lp > -1e29  # bins a trimmed vocabulary emptied (heal/run.trimmed_targets) are no bins
    tail_p = (1 - p_top.sum(1)).clamp_min(1e-9)
    tail_q = (1 - (q_top.exp() * kept).sum(1)).clamp_min(1e-9)
    return ((p_top * (lp - q_top)).sum(1) + tail_p * (tail_p.log() - tail_q.log())).mean()


class FileStudent:
    """A packed file as a torch model: quantized linears with fixed codes, learnable scales."""

    def __init__(self, pack: Pack, ids: np.ndarray, device):
        self.pack, self.dev = pack, torch.device(device)
        shapes = {n: tuple(t["shape"]) for n, t in pack.tensors.items()}
        self.spec = spec = describe_model(pack.header["model"], shapes)
        p = self.p = Params(self.dev)
        for b in spec.blocks:
            for lin in b.linears():
                self._add(lin.name + ".weight")
                if lin.bias:
                    p.vector(lin.name + ".bias", pack.array(lin.name + ".bias"))
            for n in b.norms():
                for suffix in (".weight", ".bias") if n.bias else (".weight",):
                    p.vector(n.name + suffix, pack.array(n.name + suffix))
        for suffix in (".weight", ".bias") if spec.final_norm.bias else (".weight",):
            p.vector(spec.final_norm.name + suffix, pack.array(spec.final_norm.name + suffix))
        head = spec.head.name
        p.fixed(head + ".weight", pack.array(head + ".weight"))
        if spec.head.bias:
            p.fixed(head + ".bias", pack.array(head + ".bias"))
        if spec.head_proj is not None:
            p.fixed("head_proj.weight", pack.array("head_proj.weight"))
        rows = pack.array("embed.weight", rows=ids.ravel()).reshape(ids.shape + (-1,))
        pos = pack.array("pos_embed.weight")[: ids.shape[1]] if spec.learned_pos else None
        self.x0 = torch.from_numpy(embed(spec, rows, pos))
        inv = {k.split(".")[1]: pack.array(k) for k in pack.tensors if k.startswith("rope.")}
        self.tables = torch_block.rope(spec, inv, ids.shape[1], self.dev)
        self.blocks = [torch_block.TorchBlock(spec, b, p) for b in spec.blocks]

    def _add(self, name: str):
        """A block's linear: quantized -> fixed codes with learnable scales; float -> frozen."""
        t = self.pack.tensors[name]
        typ = t["type"]
        if STORAGE_TYPES[typ].quantized:
            self.p.quantized(name, typ, tuple(t["shape"]), t["group_size"], self.pack.parts(name), t.get("nnz"),
                             latent=False)
        else:
            self.p.fixed(name, self.pack.array(name))

    def hidden(self, rows):
        """The last block's output for batch `rows`. Training keeps only each block's input and
        recomputes the block in the backward pass (activation checkpointing: a block's
        activations are ~300 MB at 4 x 512 tokens on the 0.5B, 24 blocks would hold 7 GB)."""
        x = self.x0[rows].to(self.dev)
        for b in self.blocks:
            x = checkpoint(b, x, self.tables, use_reentrant=False) if torch.is_grad_enabled() else b(x, self.tables)
        return x

    def logits(self, h):
        return torch_block.logits(self.spec, self.p, h)

    def loss(self, rows, idx, lp):
        """Mean top-k KL of batch `rows`; idx/lp (B, T, k) teacher targets of those rows."""
        h = self.hidden(rows).reshape(-1, self.x0.shape[-1])
        idx, lp = idx.reshape(-1, idx.shape[-1]), lp.reshape(-1, lp.shape[-1])
        total = 0.0
        for a in range(0, h.shape[0], CHUNK):
            c = slice(a, a + CHUNK)
            n = h[c].shape[0]
            part = checkpoint(lambda hc, i, l: topk_kl(self.logits(hc), i, l), h[c], idx[c], lp[c],
                              use_reentrant=False)
            total = total + part * (n / h.shape[0])
        return total

    def write(self, out, header: dict, amend=None):
        """The trained file: every tensor as stored, the trained ones replaced."""
        pack = self.pack
        trained = set(self.p.mods) | set(self.p.vecs)
        with PackWriter(out) as w:
            for t in pack.tensors.values():
                name = t["name"]
                if name in trained:
                    kind, *rest = self.p.stored(name)
                    if kind == "q":
                        typ, shape, g, parts, nnz = rest
                        w.add(name, typ, shape, parts, group_size=g, nnz=nnz)
                    else:
                        w.add_array(name, rest[0], t["type"])
                else:
                    w.add(name, t["type"], t["shape"], pack.parts(name), group_size=t.get("group_size"),
                          nnz=t.get("nnz"))
            if amend is not None:  # the measurement loads the source model and the file beside us
                self.release()
            w.finish(header, amend=amend)

    def release(self):
        """Drop the student's tensors once written (the codes as float32, 4 bytes a weight, and
        the frozen head); it cannot run afterwards."""
        for d in (self.p.mods, self.p.vecs, self.p.frozen):
            d.clear()
        self.blocks, self.x0 = [], None
        gc.collect()


def record(tokens: int, before: float, after: float, seconds: float) -> dict:
    """The recipe's record of the end-to-end phase."""
    return {"step": "heal_e2e", "tokens": int(tokens), "kl": {"before": float(f"{before:.6g}"),
                                                            "after": float(f"{after:.6g}")},
            "seconds": round(seconds, 1)}


def heal_file(src, out, ids: np.ndarray, topk: tuple, opts, state, amend=None,
              quiet: bool = False) -> dict:
    """Train `src`'s scales and norms on calibration `ids` (B, T) against the teacher's `topk`
    ((B*T, k) indices and log-probabilities); write `out`. Returns the phase's record and the
    trained student (whose logits the written file reproduces), or None with `amend` (the
    measurement): the student's memory goes before it runs. With --heal-tokens auto the last
    rows only measure: training stops once two passes over the rest gain under 1 % on them, and
    the best pass is written."""
    t0 = time.time()
    pack = Pack(src)
    st = FileStudent(pack, ids, opts.device)
    B, T = ids.shape
    idx = torch.from_numpy(topk[0].astype(np.int64).reshape(B, T, -1))
    lp = torch.from_numpy(topk[1].reshape(B, T, -1))
    train, held = split_rows(B, opts)
    batch = min(opts.batch, len(train))
    steps = steps_for(opts.tokens, batch, T)
    probe = held if len(held) else np.arange(min(B, batch))  # the KL before and after (first rows: trained on)

    def kl(rows):
        return st.loss(rows, idx[rows].to(st.dev), lp[rows].to(st.dev))

    def measured(rows):
        with torch.no_grad():
            return kl(rows).item()

    trainer = Trainer(st.p.groups(0.0, opts.e2e_lr_scale, opts.e2e_lr_float, 0.0), steps, after_step=st.p.clamp, name="e2e")
    flat = UntilFlat.of(opts, trainer, len(train), batch, len(held))
    saved = state.load("e2e.npz")
    if saved is not None:
        trainer.restore(saved)
        before = float(saved["before"])
        if flat is not None:
            flat.restore(saved)
    else:
        before = measured(probe)
        if flat is not None:
            flat.update(before)
    meter = Meter("heal end-to-end", steps, batch * T, quiet)
    order = train[batch_order(len(train), batch, steps, opts.seed + 7919)]
    last_save = time.time()
    for k in range(trainer.step_no, steps):
        if flat is not None and flat.done:
            break
        trainer.step(kl(order[k]))
        meter.tick(k, trainer.last_loss)
        boundary = flat is not None and flat.round_ends()
        if boundary:
            flat.update(measured(held))
            if not quiet:
                print(f"heal end-to-end: {k + 1} steps, held-out KL {flat.history[-1]:.5f} (before "
                      f"{flat.history[0]:.5f}){'; flat, stopping' if flat.done else ''}", file=sys.stderr, flush=True)
        if boundary or time.time() - last_save >= opts.save_every or k + 1 == steps:
            state.save("e2e.npz", {**trainer.state(), "before": np.asarray(before),
                                   **(flat.state() if flat is not None else {})})
            last_save = time.time()
    if flat is not None:
        flat.finish()  # the best round, whose held-out KL (the probe's) was measured
    after = flat.best_error if flat is not None else measured(probe)
    steps = trainer.step_no
    if not quiet:
        where = "held-out" if len(held) else "calibration"
        print(f"heal end-to-end: KL {before:.4f} -> {after:.4f} on {len(probe) * T} {where} tokens "
              f"({steps} steps, {time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    rec = record(steps * batch * T, before, after, time.time() - t0)
    header = {k: v for k, v in pack.header.items() if k not in ("tensors", "format_version", "min_reader")}
    header["recipe"] = list(header.get("recipe", [])) + [rec]
    st.write(out, header, amend)
    return rec, (st if amend is None else None)
