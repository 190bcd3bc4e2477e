"""One ONNX graph for the whole decoder, built from a pack's header and tensor directory.

The same builder serves the onnxruntime backend (weights handed to onnxruntime as OrtValues
over the memory-mapped pack) and `llmpack export-onnx` (weights written to an external data
file, inputs/outputs named as onnxruntime-genai expects). Every per-layer size (heads, KV
heads, MLP width) comes from that layer's tensor shapes, as in the numpy backend.

Operators (onnxruntime contrib ops where they fit, standard ONNX otherwise):

- linears: MatMulNBits for q8/q4/q2 (the pack stores its layout); FusedMatMul(transB=1) for
  f32, with an in-graph Cast for f16/bf16 (constant-folded at session creation, so
  onnxruntime converts, pre-packs and frees the f32 copy itself: no f16 GEMM on x86 CPUs).
  Quantization scales are stored f16 and also widened by a folded Cast (MatMulNBits wants
  scales of A's type).
- embeddings: Gather (+Cast) or GatherBlockQuantized; a tied quantized head re-uses the
  embedding's bytes for its MatMulNBits.
- attention: GroupQueryAttention with the KV cache as past/present inputs/outputs of
  capacity length (the caller binds past and present to one buffer), sliding windows via
  local_window_size, RoPE inside the op when its cos/sin cache can express it (rotary
  dim/2 a multiple of 8); otherwise RoPE with standard ops before the op (fallback).
  Gemma-3's q/k norms are RMSNormalization over a (…, heads, head_dim) view:
  GQA's fused q/k-norm inputs are not honored by the CPU provider.
- norms: RMSNormalization / LayerNormalization, and the contrib Skip(Simplified)LayerNormalization
  carrying the residual stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmpack.formats.blocks import ModelSpec, Norm, check_pack
from llmpack.formats.errors import FormatError
from llmpack.formats.reader import Pack
from llmpack.formats.spec import STORAGE_TYPES

from . import onnx_proto as P
from .onnx_proto import BFLOAT16, FLOAT, INT32, INT64, Graph

MS = "com.microsoft"
OPSETS = {"": 23, MS: 1}  # 23: RMSNormalization is a standard op (onnx.checker accepts the graph)
QUANT_BITS = {k: v.bits for k, v in STORAGE_TYPES.items() if v.quantized}


@dataclass
class LayerShape:
    n_heads: int
    n_kv: int
    head_dim: int
    window: int | None


@dataclass
class DecoderGraph:
    """The built graph: serialize with `model(...)`; `weights` maps initializer name -> array view."""

    graph: Graph
    weights: dict = field(default_factory=dict)  # name -> (numpy array, onnx elem type)
    layers: list = field(default_factory=list)  # LayerShape per layer (KV cache shapes)
    vocab_size: int = 0
    genai_io: bool = False
    rope_in_gqa: bool = True
    rope_inputs: dict = field(default_factory=dict)  # rope kind -> (cos, sin) input names

    def rope_arrays(self, pack: Pack, positions: int) -> dict:
        """Input name -> table for the rope inputs, covering `positions` positions."""
        out = {}
        for kind, (cname, sname) in self.rope_inputs.items():
            out[cname], out[sname] = rope_cos_sin(pack, kind, positions, self.rope_in_gqa)
        return out

    def model(self, external_info) -> bytes:
        """Serialize; `external_info(name, array)` -> {"location", "offset", "length"} per weight."""
        g = self.graph
        saved = list(g.initializers)
        for name, (arr, elem) in self.weights.items():
            g.initializer(name, dtype=elem, dims=arr.shape, external=external_info(name, arr))
        try:
            return P.model_bytes(g, OPSETS, metadata={"llmpack.genai_io": int(self.genai_io)})
        finally:
            g.initializers = saved


def rope_cos_sin(pack: Pack, kind: str, positions: int, half: bool):
    """cos/sin tables (positions, R/2) for GroupQueryAttention (half) or (positions, R) for the
    standard-op rotate-half fallback; the rope scaling factor folded in, as the numpy backend."""
    inv = pack.array(f"rope.{kind}.inv_freq")
    scaling = np.float32(pack.header["model"]["rope_scaling"][kind])
    f = np.arange(positions, dtype=np.float32)[:, None] * inv[None, :]
    cos, sin = (np.cos(f) * scaling).astype(np.float32), (np.sin(f) * scaling).astype(np.float32)
    if not half:
        cos, sin = np.concatenate([cos, cos], 1), np.concatenate([sin, sin], 1)
    return cos, sin


class _Builder:
    def __init__(self, pack: Pack, spec: ModelSpec, accuracy_level: int, genai_io: bool, max_positions: int | None,
                 fuse: bool):
        self.pack = pack
        self.spec = spec
        self.acc = accuracy_level
        self.fuse = fuse
        self.g = Graph("llmpack_decoder")
        self.out = DecoderGraph(self.g, genai_io=genai_io)
        self.eps = float(spec.norm_eps)
        self.max_pos = max_positions or spec.context_length
        self._cast_cache: dict[str, str] = {}
        self._widened: dict[str, dict] = {}

    # -- weights -----------------------------------------------------------------------------
    def weight(self, name: str, arr: np.ndarray, elem: int | None = None) -> str:
        if name not in self.out.weights:
            self.g.reserve(name)
            self.out.weights[name] = (arr, elem if elem is not None else P.NUMPY_TO_ONNX[arr.dtype])
        return name

    def has(self, name):
        return name in self.pack

    def kind(self, name):
        return self.pack.tensors[name]["type"]

    def plain_f32(self, name: str) -> str:
        """A plain tensor as float32: mapped as stored, widened in-graph (folded once at load)."""
        if name in self._cast_cache:
            return self._cast_cache[name]
        kind = self.kind(name)
        data = self.pack.parts(name)["data"]
        if kind == "f32":
            out = self.weight(name, data)
        elif kind == "f16":
            out = self.g.node("Cast", [self.weight(name, data)], to=FLOAT, name=name + "/f32")
        elif kind == "bf16":
            out = self.g.node("Cast", [self.weight(name, data, BFLOAT16)], to=FLOAT, name=name + "/f32")
        elif STORAGE_TYPES[kind].quantized:
            raise ValueError(f"{name}: quantized tensors are only supported as 2-D linear weights")
        else:
            raise ValueError(f"{name}: tensor of type {kind} is not numeric")
        self._cast_cache[name] = out
        return out

    def quant_parts(self, name: str, flat: bool = False, f32_scales: bool = True):
        """(codes, scales f32, zeros or '', bits, group size) of a quantized tensor; codes are
        (N, G, blob) as MatMulNBits wants them, or (N, G*blob) for GatherBlockQuantized (flat).
        Scales are stored f16; MatMulNBits wants A's type, so they are widened by a folded Cast
        (f32_scales=False returns the f16 initializer, for stacking before one Cast)."""
        t = self.pack.tensors[name]
        parts = self.pack.parts(name)
        bits = QUANT_BITS[t["type"]]
        sparse = STORAGE_TYPES[t["type"]].sparse  # no sparse kernel: expanded to q{bits} (private memory)
        if bits == 3 or sparse:  # no 3-bit MatMulNBits kernel: widened to the q4 layout (4/3 the bytes)
            from llmpack.formats.quant import widen_q3_to_q4
            from llmpack.formats.sparse import expand

            if name not in self._widened:  # once per tensor: a tied head shares the embedding's copy
                dense = expand(parts, t["type"], t["shape"], t["group_size"], t.get("nnz")) if sparse else parts
                self._widened[name] = widen_q3_to_q4(dense) if bits == 3 else dense
            parts, bits = self._widened[name], 4 if bits == 3 else bits
        data = parts["data"]
        b = (self.weight(name + "/data2d", data.reshape(data.shape[0], -1)) if flat
             else self.weight(name + "/data", data))
        key = name + "/scales"
        if not f32_scales:
            return b, self.weight(key, parts["scales"]), self._zeros(name, parts), bits, t["group_size"]
        if key not in self._cast_cache:
            self._cast_cache[key] = self.g.node("Cast", [self.weight(key, parts["scales"])], to=FLOAT,
                                                name=key + "/f32")
        return b, self._cast_cache[key], self._zeros(name, parts), bits, t["group_size"]

    def _zeros(self, name, parts) -> str:
        return self.weight(name + "/zeros", parts["zeros"]) if "zeros" in parts else ""

    # -- building blocks -----------------------------------------------------------------------
    def linear(self, x: str, prefix: str) -> str:
        return self.linears(x, [prefix])

    def fusable(self, prefixes) -> bool:
        """Whether these linears (same input) can run as one matmul over rows stacked in-graph."""
        if not self.fuse:
            return False
        ts = [self.pack.tensors[p + ".weight"] for p in prefixes]
        key = {(t["type"], t["shape"][1], t.get("group_size"), "zeros" in t["parts"]) for t in ts}
        biases = {self.has(p + ".bias") for p in prefixes}
        return len(key) == 1 and len(biases) == 1

    def linears(self, x: str, prefixes: list) -> str:
        """y = x @ concat(W_i).T (+ b): one MatMulNBits/FusedMatMul over the stacked rows.

        Stacking is a Concat of initializers, constant-folded by onnxruntime at session
        creation and then pre-packed: no copy in the file, fewer kernel launches (the k/v
        matrices alone are too small to keep two threads busy); onnxruntime keeps part of the
        folded stack resident (+20 MB on the 0.5B q4 model)."""
        g = self.g
        tname = prefixes[0] + ".weight"
        n = sum(self.pack.tensors[p + ".weight"]["shape"][0] for p in prefixes)
        k = self.pack.tensors[tname]["shape"][1]
        name = prefixes[0] if len(prefixes) == 1 else prefixes[0] + "+" + "+".join(p.rsplit(".", 1)[1]
                                                                                  for p in prefixes[1:])

        def stack(items):
            return items[0] if len(items) == 1 else g.node("Concat", items, axis=0, name=name + "/stack")

        bias = stack([self.plain_f32(p + ".bias") for p in prefixes]) if self.has(prefixes[0] + ".bias") else ""
        if STORAGE_TYPES[self.kind(tname)].quantized:
            parts = [self.quant_parts(p + ".weight", f32_scales=len(prefixes) == 1) for p in prefixes]
            b, s, z, bits, gs = parts[0]
            if len(prefixes) > 1:
                b = stack([q[0] for q in parts])
                s = g.node("Cast", [stack([q[1] for q in parts])], to=FLOAT, name=name + "/scales_f32")
                z = stack([q[2] for q in parts]) if z else ""
            inputs = [x, b, s, z, "", bias]
            while inputs[-1] == "":
                inputs.pop()
            return g.node("MatMulNBits", inputs, domain=MS, name=name, K=k, N=n, bits=bits, block_size=gs,
                          accuracy_level=self.acc)
        y = g.node("FusedMatMul", [x, stack([self.plain_f32(p + ".weight") for p in prefixes])], domain=MS,
                   name=name, transB=1)
        return g.node("Add", [y, bias], name=name + "/bias") if bias else y

    def norm(self, x: str, n: Norm, skip: str | None = None):
        """Normalize x (after adding skip); returns (normed, x + skip) — the second only with skip."""
        prefix, rms = n.name, n.kind == "rms"
        w = self.plain_f32(prefix + ".weight")
        b = self.plain_f32(prefix + ".bias") if n.bias else ""
        if skip is None:
            if rms:
                return self.g.node("RMSNormalization", [x, w], name=prefix, axis=-1, epsilon=self.eps), None
            return self.g.node("LayerNormalization", [x, w] + ([b] if b else []), name=prefix, axis=-1,
                               epsilon=self.eps), None
        if rms:
            outs = self.g.node("SkipSimplifiedLayerNormalization", [x, skip, w], n_out=4, domain=MS, name=prefix,
                               epsilon=self.eps)
        else:
            outs = self.g.node("SkipLayerNormalization", [x, skip, w] + ([b] if b else []), n_out=4, domain=MS,
                               name=prefix, epsilon=self.eps)
        return outs[0], outs[3]

    def act(self, x: str) -> str:
        a = self.spec.blocks[0].mlp.act
        if a == "silu":
            return self.g.node("Mul", [x, self.g.node("Sigmoid", [x])])
        if a == "gelu_tanh":
            return self.g.node("FastGelu", [x], domain=MS)
        if a == "gelu":
            return self.g.node("Gelu", [x], domain=MS)
        if a == "relu":
            return self.g.node("Relu", [x])
        raise ValueError(f"activation {a!r} is not supported by the onnxruntime backend")

    def reshape(self, x, shape):
        return self.g.node("Reshape", [x, self.g.const("shape", np.array(shape, np.int64))])

    # -- model ----------------------------------------------------------------------------------
    def build(self) -> DecoderGraph:
        g, spec = self.g, self.spec
        V = spec.vocab
        self.out.vocab_size = V
        g.output("logits", FLOAT, ["batch_size", "sequence_length", V])  # first output, as genai's models
        ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
        if self.out.genai_io:
            mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        pos_ids = g.input("position_ids", INT64, ["batch_size", "sequence_length"])
        if self.out.genai_io:
            seqlens = g.node("Cast", [g.node("Sub", [g.node("ReduceSum", [mask, g.const("axes", np.array([1]))]),
                                                     g.const("one", np.array(1, np.int64))])], to=INT32,
                             name="seqlens_k")
            total = g.node("Cast", [g.node("Gather", [g.node("Shape", [mask]), g.const("one", np.array(1))],
                                           axis=0)], to=INT32, name="total_seq_len")
        else:
            seqlens = g.input("seqlens_k", INT32, ["batch_size"])
            total = g.input("total_sequence_length", INT32, [])
            logits_start = g.input("logits_start", INT64, [1])

        x = self.gather_rows("embed.weight", ids)
        if spec.embed_scale:
            x = g.node("Mul", [x, g.const("embed_scale", np.array(spec.embed_scale, np.float32))])
        if spec.learned_pos:
            x = g.node("Add", [x, self.gather_rows("pos_embed.weight", pos_ids)])

        rope = self.rope_tables()
        # The residual stream is carried as (res, pending): x = res + pending, added inside the next
        # Skip(Simplified)LayerNormalization. A sliced block's shortcut maps res before its MLP add.
        res, pending = x, None
        for b in spec.blocks:
            if pending is None:
                h, _ = self.norm(res, b.attn_norm)
            else:
                h, res = self.norm(pending, b.attn_norm, skip=res)
            a = self.attention(h, b, seqlens, total, pos_ids, rope)
            if b.post_attn_norm is not None:
                a, _ = self.norm(a, b.post_attn_norm)
            if b.parallel:
                res = self.shortcut(res, b)
                pending = g.node("Add", [a, self.mlp(h, b)])
                continue
            h, res = self.norm(a, b.mlp_norm, skip=res)
            f = self.mlp(h, b)
            if b.post_mlp_norm is not None:
                f, _ = self.norm(f, b.post_mlp_norm)
            res = self.shortcut(res, b)
            pending = f
        if pending is None:
            h, _ = self.norm(res, spec.final_norm)
        else:
            h, _ = self.norm(pending, spec.final_norm, skip=res)
        if not self.out.genai_io:  # logits for positions >= logits_start only (prefill needs just the last)
            h = g.node("Slice", [h, logits_start, g.const("end", np.array([2 ** 62], np.int64)),
                                 g.const("axes", np.array([1], np.int64))], name="logits_rows")
        logits = self.head(h)
        cap = spec.final_softcap
        if cap:
            c = g.const("softcap", np.array(cap, np.float32))
            logits = g.node("Mul", [g.node("Tanh", [g.node("Div", [logits, c])]), c])
        g.node("Identity", [logits], outputs=["logits"])
        return self.out

    def shortcut(self, res: str, b) -> str:
        return res if b.shortcut is None else self.linear(res, b.shortcut.name)

    def gather_rows(self, name: str, idx: str) -> str:
        """Rows `idx` of a 2-D table as float32, widening only the gathered rows."""
        g = self.g
        kind = self.kind(name)
        D = self.pack.tensors[name]["shape"][1]
        if not STORAGE_TYPES[kind].quantized:
            elem = {"f32": FLOAT, "f16": P.FLOAT16, "bf16": BFLOAT16}[kind]
            x = g.node("Gather", [self.weight(name, self.pack.parts(name)["data"], elem), idx], axis=0, name=name)
            return x if kind == "f32" else g.node("Cast", [x], to=FLOAT)
        b, s, z, bits, gs = self.quant_parts(name, flat=True)
        x = g.node("GatherBlockQuantized", [b, idx, s] + ([z] if z else []), domain=MS, name=name,
                   bits=bits, block_size=gs, gather_axis=0, quantize_axis=1)
        if self.out.weights[b][0].shape[1] * 8 // bits != D:  # K padded up to whole groups
            x = g.node("Slice", [x, g.const("start", np.array([0])), g.const("end", np.array([D])),
                                 g.const("axes", np.array([-1]))])
        return x

    def head(self, h: str) -> str:
        if not self.spec.tied:
            return self.linear(h, "head")
        if self.spec.head_proj is not None:  # a tied head reading another basis (converter/steps/tie_head.py)
            h = self.linear(h, "head_proj")
        if STORAGE_TYPES[self.kind("embed.weight")].quantized:
            return self.linear(h, "embed")  # MatMulNBits over the embedding's own bytes
        return self.g.node("FusedMatMul", [h, self.plain_f32("embed.weight")], domain=MS, name="head",
                           transB=1)

    def mlp(self, h: str, b) -> str:
        mlp = b.mlp
        if mlp.gate is None:
            return self.linear(self.act(self.linear(h, mlp.up.name)), mlp.down.name)
        pair = [mlp.gate.name, mlp.up.name]
        if self.fusable(pair):
            f = mlp.width
            gate, up = self.g.node("Split", [self.linears(h, pair), self.g.const("split", np.array([f, f]))],
                                   n_out=2, axis=-1, name=b.prefix + "mlp.split")
        else:
            gate, up = self.linear(h, mlp.gate.name), self.linear(h, mlp.up.name)
        return self.linear(self.g.node("Mul", [self.act(gate), up]), mlp.down.name)

    def rope_tables(self) -> dict:
        """rope kind -> (cos, sin) names: graph inputs the backend fills for its KV capacity, or
        (export) initializers of context_length rows, as onnxruntime-genai's models have."""
        tables = {}
        r = self.spec.rotary_dim
        self.out.rope_in_gqa = r > 0 and (r // 2) % 8 == 0
        width = r // 2 if self.out.rope_in_gqa else r
        for kind in self.spec.rope_scaling:
            names = (f"rope.{kind}.cos", f"rope.{kind}.sin")
            if self.out.genai_io:
                cos, sin = rope_cos_sin(self.pack, kind, self.max_pos, self.out.rope_in_gqa)
                tables[kind] = (self.weight(names[0], cos), self.weight(names[1], sin))
            else:
                tables[kind] = tuple(self.g.input(n, FLOAT, ["rope_positions", width]) for n in names)
                self.out.rope_inputs[kind] = names
        return tables

    def apply_rope(self, x: str, heads: int, cos: str, sin: str, pos_ids: str) -> str:
        """Rotate-half RoPE on the first R dims of each head with standard ops; x (B, T, heads*hd)."""
        g, hd, r = self.g, self.spec.head_dim, self.spec.rotary_dim
        x4 = self.reshape(x, [0, 0, heads, hd])
        c = g.node("Unsqueeze", [g.node("Gather", [cos, pos_ids], axis=0), g.const("axes", np.array([2]))])
        s = g.node("Unsqueeze", [g.node("Gather", [sin, pos_ids], axis=0), g.const("axes", np.array([2]))])

        def sl(a, lo, hi):
            return g.node("Slice", [a, g.const("start", np.array([lo])), g.const("end", np.array([hi])),
                                    g.const("axes", np.array([3]))])

        xr = sl(x4, 0, r)
        rot = g.node("Concat", [g.node("Neg", [sl(x4, r // 2, r)]), sl(x4, 0, r // 2)], axis=3)
        out = g.node("Add", [g.node("Mul", [xr, c]), g.node("Mul", [rot, s])])
        if r < hd:
            out = g.node("Concat", [out, sl(x4, r, hd)], axis=3)
        return self.reshape(out, [0, 0, heads * hd])

    def attention(self, h, b, seqlens, total, pos_ids, rope):
        g, a, i = self.g, b.attn, b.index
        hd, n_heads, n_kv = a.head_dim, a.n_heads, a.n_kv
        self.out.layers.append(LayerShape(n_heads, n_kv, hd, a.window))
        roped = a.rope is not None and a.rope in rope
        qkv = [a.q.name, a.k.name, a.v.name]
        if (a.q_norm is None and (self.out.rope_in_gqa or not roped)
                and self.fusable(qkv)):  # GroupQueryAttention takes q/k/v packed in one tensor
            q, k, v = self.linears(h, qkv), "", ""
        else:
            q, k, v = (self.linear(h, x) for x in qkv)
        if a.q_norm is not None:
            q = self.reshape(self.norm(self.reshape(q, [0, 0, n_heads, hd]), a.q_norm)[0], [0, 0, -1])
            k = self.reshape(self.norm(self.reshape(k, [0, 0, n_kv, hd]), a.k_norm)[0], [0, 0, -1])
        cos = sin = ""
        if roped:
            cos, sin = rope[a.rope]
            if not self.out.rope_in_gqa:
                q = self.apply_rope(q, n_heads, cos, sin, pos_ids)
                k = self.apply_rope(k, n_kv, cos, sin, pos_ids)
                cos = sin = ""
        past_k = g.input(f"past_key_values.{i}.key", FLOAT, ["batch_size", n_kv, "past_sequence_length", hd])
        past_v = g.input(f"past_key_values.{i}.value", FLOAT, ["batch_size", n_kv, "past_sequence_length", hd])
        inputs = [q, k, v, past_k, past_v, seqlens, total, cos, sin]
        while inputs[-1] == "":
            inputs.pop()
        present = [f"present.{i}.key", f"present.{i}.value"]
        out = g.node("GroupQueryAttention", inputs, n_out=3, domain=MS, name=b.prefix + "attn",
                     outputs=[g.unique(b.prefix + "attn/out")] + present,
                     num_heads=n_heads, kv_num_heads=n_kv, scale=float(self.spec.attn_scale),
                     local_window_size=int(a.window) if a.window else -1, do_rotary=int(bool(cos)))
        for name in present:
            g.output(name, FLOAT, ["batch_size", n_kv, "total_sequence_length", hd])
        return self.linear(out[0], a.o.name)


def build_decoder(pack: Pack, accuracy_level: int = 4, genai_io: bool = False,
                  max_positions: int | None = None, fuse: bool = True) -> DecoderGraph:
    """Build the decoder graph of `pack` (no weights are read or copied, only views taken).

    fuse: run q/k/v (when GroupQueryAttention can take them packed) and gate/up as one matmul.
    Raises FormatError when the header's model description does not fit its tensors."""
    spec = check_pack(pack.header, {n: t["shape"] for n, t in pack.tensors.items()}, f"{pack.path}: ")
    try:
        return _Builder(pack, spec, accuracy_level, genai_io, max_positions, fuse).build()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as e:
        raise FormatError(f"{pack.path}: the model description does not fit the file's tensors "
                          f"({e.__class__.__name__}: {e}); convert the model again") from e
