"""Pack surgery for tests: re-quantize a pack, or prune heads/neurons of single layers.

Both write a new pack with formats.writer.PackWriter from an existing one (the header's model
description is kept: every per-layer size is read from tensor shapes by the runtimes).
"""
from __future__ import annotations

import numpy as np

from llmpack.formats import quant
from llmpack.formats.reader import Pack
from llmpack.formats.writer import PackWriter


def _rewrite(src, dst, transform):
    """transform(name, f32 array) -> (array, "f32") or (array, "qB", group_size, symmetric)."""
    p = Pack(src)
    with PackWriter(dst) as w:
        for t in p.header["tensors"]:
            name = t["name"]
            if t["type"] == "u8":
                w.add_blob(name, p.blob(name))
                continue
            arr, *how = transform(name, p.array(name))
            kind = how[0]
            if kind.startswith("q"):
                bits, gs, sym = int(kind[1:]), how[1], how[2]
                w.add(name, kind, arr.shape, quant.quantize_rtn(arr, bits, gs, sym), group_size=gs)
            else:
                w.add_array(name, arr, kind)
        w.finish({k: v for k, v in p.header.items() if k not in ("tensors", "format_version", "min_reader")})
    p.close()
    return dst


def requantize(src, dst, bits: int, group_size: int = 32, symmetric: bool = True):
    """Every 2-D weight (embedding, head, linears) to q`bits`; norms, biases, tables stay f32."""
    def tf(name, a):
        if a.ndim == 2 and not name.startswith("rope."):
            return a, f"q{bits}", group_size, symmetric
        return a, "f32"
    return _rewrite(src, dst, tf)


def prune(src, dst, plan: dict):
    """Drop heads/neurons per layer. plan = {layer: {"q": [kept query heads], "kv": [kept kv heads],
    "ffn": [kept MLP neurons]}}; kept query heads must be listed grouped by their kept kv head."""
    hd = Pack(src).header["model"]["head_dim"]

    def rows(heads):
        return np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in heads])

    def tf(name, a):
        parts = name.split(".")
        if parts[0] != "layers" or int(parts[1]) not in plan:
            return a, "f32"
        keep = plan[int(parts[1])]
        rest = ".".join(parts[2:])
        if "q" in keep:
            if rest.startswith("attn.q.") and "norm" not in rest:
                return a[rows(keep["q"])], "f32"
            if rest.startswith(("attn.k.", "attn.v.")):
                return a[rows(keep["kv"])], "f32"
            if rest == "attn.o.weight":
                return np.ascontiguousarray(a[:, rows(keep["q"])]), "f32"
        if "ffn" in keep:
            idx = np.asarray(keep["ffn"])
            if rest.startswith(("mlp.up.", "mlp.gate.")):
                return a[idx], "f32"
            if rest == "mlp.down.weight":
                return np.ascontiguousarray(a[:, idx]), "f32"
        return a, "f32"
    return _rewrite(src, dst, tf)
