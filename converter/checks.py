"""Refusals before a conversion writes anything: what the runtime would refuse, the converter refuses.

Each is one LlmpackError naming the problem (and the tensor or file) instead of a pack that
converts with exit 0 and then fails to load, or an internal IndexError:
- the tokenizer must load with the runtime's own Tokenizer, and its header section and
  generation_config.json must pass the reader's schema (formats/schema.py);
- config.json's num_hidden_layers must equal the number of layers the checkpoint holds;
- every tensor shape must agree with the others and with the head size (the same rules the
  numpy backend checks at load: whole heads, K/V rows equal, grouped query heads, o/down/norm
  widths equal to the hidden size, and so on);
- no weight may hold NaN or infinity (checked tensor by tensor as the checkpoint streams: a float64
  sum per tensor is finite exactly when every element is, at memory speed).
"""
from __future__ import annotations

import re

import numpy as np

from llmpack.formats.errors import FormatError, LlmpackError
from llmpack.formats.schema import check_generation_section, check_tokenizer_section


def check_tokenizer(ckpt, section: dict, blob: bytes, generation: dict):
    """The tokenizer loads in the runtime and the header sections pass the reader's schema."""
    from llmpack.runtime.tokenizer import Tokenizer

    where = ckpt.dir
    try:
        check_tokenizer_section(section, f"{where} (tokenizer files)")
        check_generation_section(generation, f"{where}/generation_config.json")
    except FormatError as e:
        raise LlmpackError(str(e).replace("; the file is corrupt", "; fix the checkpoint's files")) from None
    try:
        Tokenizer(section, blob)
    except FormatError as e:
        name = section.get("blob", "tokenizer").split("/")[-1]
        raise LlmpackError(f"{where}/{name} does not load as a tokenizer ({_first_line(e)}); "
                           f"fix or re-download the tokenizer files") from None


def check_layers(model: dict, canonical_names, num_field: str = "num_hidden_layers"):
    """config.json's layer count equals the layers whose tensors the checkpoint holds."""
    present = sorted({int(m.group(1)) for n in canonical_names if (m := re.match(r"layers\.(\d+)\.", n))})
    n = model["n_layers"]
    if not isinstance(n, int) or n < 1:
        raise LlmpackError(f"config.json: {num_field} = {n!r}; it must be a positive integer")
    if present != list(range(n)):
        held = f"layers 0..{present[-1]}" if present == list(range(len(present))) and present else \
            f"layer indices {_ranges(present)}"
        raise LlmpackError(f"config.json says {num_field} = {n} but the checkpoint holds tensors of {held}; "
                           f"fix config.json or the weight files")


def check_shapes(model: dict, shapes: dict[str, tuple], hf_of: dict[str, str]):
    """Every tensor shape agrees with the others and with head_dim (what the runtimes check at load)."""
    hd = model["head_dim"]

    def bad(name, shape, want):
        src = f" ({hf_of[name]})" if name in hf_of and hf_of[name] != name else ""
        raise LlmpackError(f"tensor {name}{src} has shape {tuple(shape)}, expected {want}; the weights do not "
                           f"fit config.json (head_dim {hd}) — fix config.json or the weight files")

    emb = shapes.get("embed.weight")
    if emb is None or len(emb) != 2:
        raise LlmpackError(f"the embedding has shape {emb}, expected (vocab, hidden)")
    V, D = emb
    expect = {"final_norm.weight": (D,), "final_norm.bias": (D,), "head.weight": (V, D), "head.bias": (V,)}
    if "pos_embed.weight" in shapes:
        pos = shapes["pos_embed.weight"]
        if len(pos) != 2 or pos[1] != D or pos[0] < model["context_length"]:
            bad("pos_embed.weight", pos, f"(>= {model['context_length']}, {D})")
    for i in range(model["n_layers"]):
        p = f"layers.{i}."
        q, k = shapes.get(p + "attn.q.weight"), shapes.get(p + "attn.k.weight")
        up = shapes.get(p + "mlp.up.weight")
        for name, s in ((p + "attn.q.weight", q), (p + "attn.k.weight", k), (p + "mlp.up.weight", up)):
            if s is not None and (len(s) != 2 or s[1] != D):
                bad(name, s, f"(rows, {D})")
        if q is not None and k is not None:
            Hq, Hk = q[0], k[0]
            if Hq % hd or Hk % hd or Hk == 0 or (Hq // hd) % (Hk // hd):
                bad(p + "attn.q.weight", q, f"whole heads of {hd} rows, a multiple of the {Hk // hd or Hk} "
                    f"key/value heads of {p}attn.k.weight {tuple(k)}")
            expect.update({p + "attn.v.weight": (Hk, D), p + "attn.o.weight": (D, Hq), p + "attn.q.bias": (Hq,),
                           p + "attn.k.bias": (Hk,), p + "attn.v.bias": (Hk,)})
        if up is not None:
            F = up[0]
            expect.update({p + "mlp.gate.weight": (F, D), p + "mlp.down.weight": (D, F), p + "mlp.up.bias": (F,),
                           p + "mlp.gate.bias": (F,)})
        expect.update({p + "attn.o.bias": (D,), p + "mlp.down.bias": (D,), p + "attn.q_norm.weight": (hd,),
                       p + "attn.k_norm.weight": (hd,)})
        for norm in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm"):
            expect[f"{p}{norm}.weight"] = expect[f"{p}{norm}.bias"] = (D,)
    for name, want in expect.items():
        if name in shapes and tuple(shapes[name]) != want:
            bad(name, shapes[name], want)


def check_finite(name: str, arr: np.ndarray):
    """Refuse a weight holding NaN or infinity, naming it (one float64 sum: exact, memory speed)."""
    if arr.dtype.kind != "f" or np.isfinite(arr.sum(dtype=np.float64)):
        return
    nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    raise LlmpackError(f"tensor {name} holds {nan} NaN and {inf} infinite values of {arr.size}; the checkpoint "
                       f"is damaged (every logit would be NaN): re-download or re-save it")


def _ranges(xs: list[int]) -> str:
    return ", ".join(map(str, xs[:8])) + (", ..." if len(xs) > 8 else "")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."
