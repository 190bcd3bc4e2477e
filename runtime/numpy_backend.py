"""The reference backend: the whole decoder in numpy, one code path for every family.

It executes the file's `formats.blocks.ModelSpec` (built and checked at load): every
per-layer size (heads, KV heads, MLP width, residual width) comes from that description, so
pruned or sliced models run unchanged. The block math is runtime/numpy_block.py, shared with
the converter's calibration runner.
"""
from __future__ import annotations

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


class NumpyBackend:
    name = "numpy"

    def __init__(self, pack: Pack):
        self.pack = pack
        self.spec = check_pack(pack.header, {n: t["shape"] for n, t in pack.tensors.items()}, f"{pack.path}: ")
        self.context_length = self.spec.context_length
        self.vocab_size = self.spec.vocab
        # f32 tensors are zero-copy views of the mapped file; other types are widened once here.
        # The embedding stays in its stored type unless f32: rows are widened as they are gathered.
        self.w = {n: pack.array(n) for n in self.spec.tensor_names()
                  if n != "embed.weight" or pack.tensors[n]["type"] == "f32"}
        if self.spec.tied and "embed.weight" not in self.w:
            self.w["embed.weight"] = pack.array("embed.weight")
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
        head = self.spec.head
        logits = linear(final_hidden(self.spec, self.w, x), self.w[head.name + ".weight"],
                        self.w.get(head.name + ".bias"))
        return softcap(self.spec, logits)

    def _embed(self, ids, pos):
        if "embed.weight" in self.w:
            rows = self.w["embed.weight"][ids]
        else:  # f16 / bf16 / quantized: widen only the rows we need
            rows = self.pack.array("embed.weight", rows=ids)
        return embed(self.spec, rows, self.w["pos_embed.weight"][pos] if self.spec.learned_pos else None)
