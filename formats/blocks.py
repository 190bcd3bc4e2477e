"""The decoder, described once: what every executor runs and what every file must contain.

`describe_model(model, shapes)` reads a header's "model" section and the tensor shapes and
returns a `ModelSpec`: per block the residual width in and out, its norms, the attention
(per-layer head counts, RoPE kind, window, q/k norms) and the MLP (kind, width), and an
optional residual shortcut matrix (SliceGPT slicing changes the residual basis and width
between blocks). The numpy backend, the onnxruntime graph builder and the converter's
calibration runner all execute this one description; none of them re-derives the
architecture. It is also the schema of the model section: every field type-checked, every
shape agreeing with its neighbours, every tensor of the file one the description expects
(`expected_tensors`), so a file that describes something else is one FormatError at load.

Canonical tensor names (i = block index; linear weights are (out, in) as torch keeps them)::

    embed.weight (V, D0)        pos_embed.weight (P, D0)      rope.<kind>.inv_freq (R/2,)
    layers.i.attn_norm.{weight,bias} (Di,)     layers.i.mlp_norm.{weight,bias} (Di,)
    layers.i.attn.{q,k,v}.{weight,bias} (H*hd | Hk*hd, Di)
    layers.i.attn.o.{weight,bias} (Di, H*hd)   [parallel block: (Do, H*hd)]
    layers.i.attn.{q_norm,k_norm}.weight (hd,)
    layers.i.post_attn_norm.weight, layers.i.post_mlp_norm.weight   (sandwich norms)
    layers.i.mlp.{gate,up}.{weight,bias} (F, Di)    layers.i.mlp.down.{weight,bias} (Do, F)
    layers.i.shortcut.weight (Do, Di)   applied to the residual just before the MLP's add
    final_norm.{weight,bias} (DL,)      head.{weight,bias} (V, DL)   (absent when tied)
    head_proj.weight (D0, DL)   tied head only, optional: logits = embed . (head_proj . h)

Di / Do: the residual width entering / leaving block i (equal unless a shortcut maps them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import FormatError

NORMS = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
MAX_WINDOW = 1 << 31  # a sliding window longer than any context is a corrupt header

# The model section's schema: key -> (required, allowed JSON kind).
_MODEL_KEYS = {
    "family": (False, str), "norm": (True, str), "norm_eps": (True, "num"), "act": (True, str),
    "gated_mlp": (False, bool), "parallel_block": (True, bool), "sandwich_norms": (False, bool),
    "head_dim": (True, "count"), "rotary_dim": (False, int), "rope_scaling": (False, dict),
    "attn_scale": (True, "num"), "embed_scale": (False, "num?"), "learned_pos": (True, bool),
    "final_softcap": (False, "num?"), "context_length": (True, "count"), "tied_head": (True, bool),
    "n_layers": (False, "count"), "layers": (True, list),
}
_LAYER_KEYS = {"window", "rope"}


@dataclass(frozen=True)
class Linear:
    name: str  # tensor prefix, e.g. "layers.3.attn.q" (weight at name + ".weight")
    n_out: int
    n_in: int
    bias: bool


@dataclass(frozen=True)
class Norm:
    name: str  # tensor prefix, e.g. "layers.3.attn_norm"
    kind: str  # "rms" or "layer"
    width: int
    bias: bool


@dataclass(frozen=True)
class Attention:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    n_heads: int
    n_kv: int
    head_dim: int
    q_norm: Norm | None
    k_norm: Norm | None
    rope: str | None  # rope kind (a key of ModelSpec.rope_scaling) or None
    window: int | None  # sliding window (keys within `window` positions) or None


@dataclass(frozen=True)
class Mlp:
    up: Linear
    down: Linear
    gate: Linear | None  # gated: act(gate(x)) * up(x); else act(up(x))
    act: str

    @property
    def width(self) -> int:
        return self.up.n_out


@dataclass(frozen=True)
class Block:
    index: int
    d_in: int
    d_out: int
    parallel: bool  # attention and MLP read the same normed input and add together (Phi-2)
    attn_norm: Norm
    attn: Attention
    post_attn_norm: Norm | None
    mlp_norm: Norm | None  # None in a parallel block
    mlp: Mlp
    post_mlp_norm: Norm | None
    shortcut: Linear | None  # (d_out, d_in) on the residual before the MLP add; None: identity

    @property
    def prefix(self) -> str:
        return f"layers.{self.index}."

    def linears(self) -> list[Linear]:
        out = [self.attn.q, self.attn.k, self.attn.v, self.attn.o]
        out += [x for x in (self.mlp.gate, self.mlp.up, self.mlp.down, self.shortcut) if x is not None]
        return out

    def norms(self) -> list[Norm]:
        return [n for n in (self.attn_norm, self.attn.q_norm, self.attn.k_norm, self.post_attn_norm,
                            self.mlp_norm, self.post_mlp_norm) if n is not None]


@dataclass(frozen=True)
class ModelSpec:
    vocab: int
    d_model: int  # embedding width (the first block's d_in)
    head_dim: int
    rotary_dim: int
    rope_scaling: dict  # rope kind -> attention scaling folded into cos/sin
    norm_eps: float
    attn_scale: float
    embed_scale: float | None
    learned_pos: bool
    final_softcap: float | None
    context_length: int
    blocks: tuple
    final_norm: Norm
    head: Linear  # name "embed" when tied (the head reuses the embedding's bytes)
    tied: bool
    head_proj: Linear | None = None  # tied head only: maps the final hidden state into the embedding's space

    def tensor_names(self) -> set[str]:
        """Every tensor the description reads (those of the file must be exactly these)."""
        names = {"embed.weight"} | {f"rope.{k}.inv_freq" for k in self.rope_scaling}
        if self.learned_pos:
            names.add("pos_embed.weight")
        for b in self.blocks:
            for lin in b.linears():
                names |= _linear_names(lin)
            for n in b.norms():
                names |= _norm_names(n)
        names |= _norm_names(self.final_norm)
        if not self.tied:
            names |= _linear_names(self.head)
        if self.head_proj is not None:
            names |= _linear_names(self.head_proj)
        return names


def _linear_names(lin: Linear) -> set[str]:
    return {lin.name + ".weight"} | ({lin.name + ".bias"} if lin.bias else set())


def _norm_names(n: Norm) -> set[str]:
    return {n.name + ".weight"} | ({n.name + ".bias"} if n.bias else set())


class _Reader:
    """Builds a ModelSpec from a model section and tensor shapes, failing with one FormatError."""

    def __init__(self, model: dict, shapes: dict, where: str):
        self.m, self.shapes, self.where = model, shapes, where

    def bad(self, what: str):
        raise FormatError(f"{self.where}model description: {what}; convert the model again")

    def shape(self, name: str, ndim: int) -> tuple | None:
        s = self.shapes.get(name)
        if s is None:
            return None
        s = tuple(s)
        if len(s) != ndim or not all(isinstance(d, int) and d > 0 for d in s):
            self.bad(f"tensor {name} has shape {list(s)}, expected {ndim} positive dimensions")
        return s

    def linear(self, name: str, n_in: int | None, n_out: int | None = None, required=True) -> Linear | None:
        w = self.shape(name + ".weight", 2)
        if w is None:
            if required:
                self.bad(f"tensor {name}.weight is missing")
            return None
        if (n_in is not None and w[1] != n_in) or (n_out is not None and w[0] != n_out):
            want = [n_out if n_out is not None else w[0], n_in if n_in is not None else w[1]]
            self.bad(f"tensor {name}.weight has shape {list(w)}, expected {want}")
        b = self.shape(name + ".bias", 1)
        if b is not None and b != (w[0],):
            self.bad(f"tensor {name}.bias has shape {list(b)}, expected [{w[0]}]")
        return Linear(name, w[0], w[1], b is not None)

    def norm(self, name: str, width: int, kind: str, required=True) -> Norm | None:
        w = self.shape(name + ".weight", 1)
        if w is None:
            if required:
                self.bad(f"tensor {name}.weight is missing")
            return None
        if w != (width,):
            self.bad(f"tensor {name}.weight has shape {list(w)}, expected [{width}]")
        b = self.shape(name + ".bias", 1)
        if b is not None and b != (width,):
            self.bad(f"tensor {name}.bias has shape {list(b)}, expected [{width}]")
        if b is not None and kind == "rms":
            self.bad(f"tensor {name}.bias: an RMS norm has no bias")
        return Norm(name, kind, width, b is not None)

    def fields(self):
        m = self.m
        for key, (required, kind) in _MODEL_KEYS.items():
            if key not in m:
                if required:
                    self.bad(f"field {key!r} is missing")
                continue
            if not _is_kind(m[key], kind):
                self.bad(f"field {key!r} = {_short(m[key])} is not {_KIND_TEXT[kind]}")
        unknown = sorted(set(m) - set(_MODEL_KEYS))
        if unknown:
            self.bad(f"unknown field {unknown[0]!r}")
        if m["norm"] not in NORMS or m["act"] not in ACTIVATIONS:
            self.bad(f"unknown norm {m['norm']!r} or activation {m['act']!r}")
        if m["norm_eps"] < 0:
            self.bad(f"norm_eps {m['norm_eps']} is negative")
        scaling = m.get("rope_scaling") or {}
        if not all(isinstance(k, str) and _is_kind(v, "num") for k, v in scaling.items()):
            self.bad("rope_scaling must map rope kinds to numbers")
        r = m.get("rotary_dim") or 0
        if scaling and not (isinstance(r, int) and 0 < r <= m["head_dim"] and r % 2 == 0):
            self.bad(f"rotary_dim {r!r} does not fit head_dim {m['head_dim']}")
        layers = m["layers"]
        if not layers or len(layers) != m.get("n_layers", len(layers)):
            self.bad("layers must be a non-empty list of n_layers objects")
        for i, spec in enumerate(layers):
            if not isinstance(spec, dict) or set(spec) - _LAYER_KEYS:
                self.bad(f"layer {i} must be an object with keys among {sorted(_LAYER_KEYS)}")
            w = spec.get("window")
            if w is not None and not (_is_kind(w, "count") and w <= MAX_WINDOW):
                self.bad(f"layer {i}: window {_short(w)} is not a positive integer")
            kind = spec.get("rope")
            if scaling and (not isinstance(kind, str) or kind not in scaling):
                self.bad(f"layer {i}: rope kind {_short(kind)} has no tables")
            if not scaling and kind is not None:
                self.bad(f"layer {i}: rope kind {_short(kind)} but the model has no RoPE tables")
        return scaling, r

    def block(self, i: int, spec: dict, d_in: int) -> Block:
        m, hd, p = self.m, self.m["head_dim"], f"layers.{i}."
        kind, parallel = m["norm"], m["parallel_block"]
        q = self.linear(p + "attn.q", d_in)
        k = self.linear(p + "attn.k", d_in)
        v = self.linear(p + "attn.v", d_in, k.n_out)
        if q.n_out % hd or k.n_out % hd or (q.n_out // hd) % (k.n_out // hd):
            self.bad(f"layer {i}: q/k rows {q.n_out}/{k.n_out} are not whole heads of {hd} in groups")
        up = self.linear(p + "mlp.up", d_in)
        gate = self.linear(p + "mlp.gate", d_in, up.n_out, required=bool(m.get("gated_mlp", False)))
        if gate is not None and not m.get("gated_mlp", True):
            self.bad(f"layer {i}: tensor {p}mlp.gate.weight but gated_mlp is false")
        down = self.linear(p + "mlp.down", up.n_out)
        d_out = down.n_out
        shortcut = self.linear(p + "shortcut", d_in, d_out, required=False)
        if shortcut is None and d_out != d_in:
            self.bad(f"layer {i}: residual width changes {d_in} -> {d_out} without {p}shortcut.weight")
        o = self.linear(p + "attn.o", q.n_out, d_out if parallel else d_in)
        sandwich = bool(m.get("sandwich_norms", False))
        if not sandwich and (p + "post_attn_norm.weight" in self.shapes or p + "post_mlp_norm.weight" in self.shapes):
            self.bad(f"layer {i} has post-norms but sandwich_norms is false")
        q_norm = self.norm(p + "attn.q_norm", hd, "rms", required=False)
        k_norm = self.norm(p + "attn.k_norm", hd, "rms", required=q_norm is not None)
        if k_norm is not None and q_norm is None:
            self.bad(f"layer {i} has only one of q_norm / k_norm")
        attn = Attention(q, k, v, o, q.n_out // hd, k.n_out // hd, hd, q_norm, k_norm,
                         spec.get("rope"), spec.get("window"))
        return Block(
            index=i, d_in=d_in, d_out=d_out, parallel=parallel,
            attn_norm=self.norm(p + "attn_norm", d_in, kind),
            attn=attn,
            post_attn_norm=self.norm(p + "post_attn_norm", o.n_out, "rms", required=sandwich),
            mlp_norm=None if parallel else self.norm(p + "mlp_norm", d_in, kind),
            mlp=Mlp(up, down, gate, m["act"]),
            post_mlp_norm=self.norm(p + "post_mlp_norm", d_out, "rms", required=sandwich),
            shortcut=shortcut)

    def build(self) -> ModelSpec:
        m = self.m
        if not isinstance(m, dict):
            self.bad("the model section is not an object")
        scaling, rotary_dim = self.fields()
        emb = self.shape("embed.weight", 2)
        if emb is None:
            self.bad("tensor embed.weight is missing")
        V, D = emb
        ctx = m["context_length"]
        if m["learned_pos"]:
            pos = self.shape("pos_embed.weight", 2)
            if pos is None or pos[1] != D or pos[0] < ctx:
                self.bad(f"pos_embed.weight does not cover {ctx} positions of width {D}")
        for kind in scaling:
            if self.shape(f"rope.{kind}.inv_freq", 1) != (rotary_dim // 2,):
                self.bad(f"tensor rope.{kind}.inv_freq must have shape [{rotary_dim // 2}]")
        blocks, width = [], D
        for i, spec in enumerate(m["layers"]):
            blocks.append(self.block(i, spec, width))
            width = blocks[-1].d_out
        final = self.norm("final_norm", width, m["norm"])
        head_proj = None
        if m["tied_head"]:
            head_proj = self.linear("head_proj", width, D, required=False)
            if head_proj is None and width != D:
                self.bad(f"a tied head needs the final width {width} to equal the embedding's {D} (or head_proj.weight)")
            if head_proj is not None and head_proj.bias:
                self.bad("head_proj has no bias; the file is corrupt or from a newer llmpack")
            head = Linear("embed", V, D, False)
        else:
            head = self.linear("head", width, V)
        return ModelSpec(
            vocab=V, d_model=D, head_dim=m["head_dim"], rotary_dim=rotary_dim, rope_scaling=dict(scaling),
            norm_eps=float(m["norm_eps"]), attn_scale=float(m["attn_scale"]), embed_scale=m.get("embed_scale"),
            learned_pos=m["learned_pos"], final_softcap=m.get("final_softcap"), context_length=ctx,
            blocks=tuple(blocks), final_norm=final, head=head, tied=m["tied_head"], head_proj=head_proj)


def describe_block(model: dict, i: int, shapes: dict, d_in: int, where: str = "") -> Block:
    """Block i alone (the converter re-describes a block after each step changes its shapes)."""
    return _Reader(model, shapes, where).block(i, model["layers"][i], d_in)


def describe_model(model: dict, shapes: dict, where: str = "") -> ModelSpec:
    """The ModelSpec of a model section over tensor shapes (name -> shape); FormatError if they
    do not describe one runnable decoder. `where` prefixes messages (e.g. "file.llmpack: ")."""
    return _Reader(model, shapes, where).build()


def expected_tensors(spec: ModelSpec, shapes: dict, where: str = "", allowed=()) -> None:
    """Every tensor of the file is one the description reads (or in `allowed`, e.g. the
    tokenizer blob): an unknown name — a renamed optional tensor — is an error, not ignored."""
    known = spec.tensor_names() | set(allowed)
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise FormatError(f"{where}model description: tensor {unknown[0]} is not part of the described "
                          f"model ({len(unknown)} unknown); the file is corrupt or from a newer llmpack")


def check_pack(header: dict, shapes: dict, where: str = "") -> ModelSpec:
    """The whole model-section check a reader runs: description, shapes, no stray tensors."""
    spec = describe_model(header.get("model"), shapes, where)
    tok = header.get("tokenizer") or {}
    expected_tensors(spec, shapes, where, allowed=[tok["blob"]] if isinstance(tok.get("blob"), str) else [])
    return spec


_KIND_TEXT = {str: "a string", bool: "a boolean", dict: "an object", list: "a list", int: "an integer",
              "num": "a finite number", "num?": "a finite number or null", "count": "a positive integer"}


def _is_kind(x, kind) -> bool:
    if kind == "num":
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        try:
            return math.isfinite(x)
        except OverflowError:  # an integer beyond float range (JSON allows 10**400)
            return False
    if kind == "num?":
        return x is None or _is_kind(x, "num")
    if kind == "count":
        return isinstance(x, int) and not isinstance(x, bool) and 0 < x < (1 << 40)
    if kind is int:
        return isinstance(x, int) and not isinstance(x, bool)
    return isinstance(x, kind)


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 40 else s[:37] + "..."
