"""The reference backend: the whole decoder in numpy, one code path for every family.

It executes the file's `formats.blocks.ModelSpec` (built and checked at load): every
per-layer size (heads, KV heads, MLP width, residual width) comes from that description, so
pruned or sliced models run unchanged. The block math is runtime/numpy_block.py, shared with
the converter's calibration runner.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from llmpack.formats.blocks import check_pack
from llmpack.formats.reader import Pack

from .numpy_block import BlockMath, embed, final_hidden, linear, rope_tables, softcap


class KVCache:
    """Per-layer K/V arrays (Hk, capacity, hd) that grow by doubling; `length` tokens are valid."""

    def __init__(self, blocks, capacity: int = 256):
        self.length = 0
        self.k = [np.zeros((b.attn.n_kv, capacity, b.attn.head_dim), np.float32) for b in blocks]
        self.v = [np.zeros((b.attn.n_kv, capacity, b.attn.head_dim), np.float32) for b in blocks]

    def reserve(self, total: int):
        cap = self.k[0].shape[1] if self.k else total
        if total <= cap:
            return
        new_cap = max(total, cap * 2)
        for store in (self.k, self.v):
            for i, a in enumerate(store):
                grown = np.zeros((a.shape[0], new_cap, a.shape[2]), np.float32)
                grown[:, : self.length] = a[:, : self.length]
                store[i] = grown

    def truncate(self, length: int):
        """Forget positions >= length (chat history edits re-use the common prefix)."""
        self.length = min(self.length, length)


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget(mapped: int = 0) -> int:
    """Bytes of widened (float32) weights the backend may keep: LLMPACK_NUMPY_BUDGET_GB, else 60 %
    of the memory available now (Linux) once the `mapped` file's pages are set aside (they are
    read at every token and count as available while still on disk), else 8 GB. Without that
    reserve a 4.95 GB 7B-shape q4 file widened 13 GB and peaked at 23.0 GB on a 24 GB machine;
    with it, 22.0 GB (decode 0.040 tok/s instead of 0.049: more tensors widen at each use)."""
    env = os.environ.get("LLMPACK_NUMPY_BUDGET_GB")
    if env is not None:
        return int(float(env) * 2**30)
    avail = available_memory()
    return max(0, avail - mapped) * 6 // 10 if avail is not None else 8 * 2**30


class Weights(Mapping):
    """Tensor name -> float32 array for the block math. f32 tensors are zero-copy views of the
    mapped file; other types are widened once at load while the widened copies fit `budget`
    bytes, in file order, and the rest at each use (a 7.6B q4 file is 30 GB as float32: it runs
    on a 24 GB machine, slowly, instead of not at all)."""

    def __init__(self, pack: Pack, names, budget: int):
        self.pack, self.names = pack, set(names)
        self.kept: dict = {}
        self.lazy = set()
        for n in sorted(self.names, key=lambda n: min(off for off, _, _ in pack.tensors[n]["parts"].values())):
            t = pack.tensors[n]
            size = 4 * int(np.prod(t["shape"]))
            if t["type"] == "f32" or size <= budget:
                self.kept[n] = pack.array(n)
                budget -= 0 if t["type"] == "f32" else size
            else:
                self.lazy.add(n)

    def __getitem__(self, name):
        if name in self.kept:
            return self.kept[name]
        if name in self.lazy:
            return self.pack.array(name)
        raise KeyError(name)

    def __contains__(self, name):
        return name in self.kept or name in self.lazy

    def __iter__(self):
        return iter(self.kept.keys() | self.lazy)

    def __len__(self):
        return len(self.kept) + len(self.lazy)


class NumpyBackend:
    name = "numpy"

    def __init__(self, pack: Pack):
        self.pack = pack
        self.spec = check_pack(pack.header, {n: t["shape"] for n, t in pack.tensors.items()}, f"{pack.path}: ")
        self.context_length = self.spec.context_length
        self.vocab_size = self.spec.vocab
        # The embedding stays in its stored type unless f32 or tied: rows are widened as gathered.
        names = [n for n in self.spec.tensor_names()
                 if n != "embed.weight" or pack.tensors[n]["type"] == "f32" or self.spec.tied]
        self.w = Weights(pack, names, memory_budget(os.path.getsize(pack.path)))
        self.blocks = [BlockMath(self.spec, b, self.w) for b in self.spec.blocks]
        self.inv_freq = {k: self.w[f"rope.{k}.inv_freq"] for k in self.spec.rope_scaling}

    def new_cache(self) -> KVCache:
        return KVCache(self.spec.blocks)

    def forward(self, ids, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Run T new tokens after the cached ones; returns logits (T, V) or (1, V) if last_only."""
        ids = np.asarray(ids, np.int64)
        T, start = len(ids), cache.length
        if start + T > self.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.context_length}")
        cache.reserve(start + T)
        pos = np.arange(start, start + T)
        x = self._embed(ids, pos)  # (T, D)
        rope = {k: rope_tables(f, pos, self.spec.rope_scaling[k]) for k, f in self.inv_freq.items()}
        for li, block in enumerate(self.blocks):
            x = block.run(x, lambda h, li=li, block=block: block.attention(h, cache.k[li], cache.v[li], start, rope))
        cache.length = start + T
        if last_only:
            x = x[-1:]
        head, h = self.spec.head, final_hidden(self.spec, self.w, x)
        if self.spec.head_proj is not None:  # a tied head reading another basis (converter/steps/tie_head.py)
            h = linear(h, self.w["head_proj.weight"], None)
        logits = linear(h, self.w[head.name + ".weight"], self.w.get(head.name + ".bias"))
        return softcap(self.spec, logits)

    def _embed(self, ids, pos):
        if "embed.weight" in self.w:
            rows = self.w["embed.weight"][ids]
        else:  # f16 / bf16 / quantized: widen only the rows we need
            rows = self.pack.array("embed.weight", rows=ids)
        return embed(self.spec, rows, self.w["pos_embed.weight"][pos] if self.spec.learned_pos else None)
