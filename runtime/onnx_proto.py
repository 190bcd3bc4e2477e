"""A minimal ONNX protobuf writer: just what llmpack's decoder graphs need, no `onnx` package.

The runtime builds its graph at load time, and `import onnx` alone costs 0.1–0.4 s and
~20 MB of dependencies (onnx, ml_dtypes) for what is a few hundred lines of protobuf
encoding. The field numbers below are those of onnx/onnx.proto (IR version 10); tests
check the output against the `onnx` package's own parser and checker.

Usage::

    g = Graph("decoder")
    x = g.input("x", FLOAT, ["batch", 4])
    y = g.node("Relu", [x])
    g.output(y, FLOAT, ["batch", 4])
    blob = model_bytes(g, opsets={"": 21})
"""
from __future__ import annotations

import struct

import numpy as np

# onnx.TensorProto.DataType
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL, FLOAT16, DOUBLE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
UINT32, UINT64, BFLOAT16 = 12, 13, 16
NUMPY_TO_ONNX = {np.dtype("float32"): FLOAT, np.dtype("uint8"): UINT8, np.dtype("int8"): INT8,
                 np.dtype("uint16"): UINT16, np.dtype("int16"): INT16, np.dtype("int32"): INT32,
                 np.dtype("int64"): INT64, np.dtype("bool"): BOOL, np.dtype("float16"): FLOAT16,
                 np.dtype("float64"): DOUBLE, np.dtype("uint32"): UINT32, np.dtype("uint64"): UINT64}
IR_VERSION = 10


# -- wire format ---------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 fields: two's complement, ten bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(int(n))


def _bytes(field: int, b: bytes | str) -> bytes:
    if isinstance(b, str):
        b = b.encode()
    return _key(field, 2) + _varint(len(b)) + b


def _float(field: int, f: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", f)


def _packed_ints(field: int, values) -> bytes:
    return _bytes(field, b"".join(_varint(int(v)) for v in values))


# -- messages ------------------------------------------------------------------------------------
def tensor_proto(name: str, arr: np.ndarray | None = None, *, dtype: int | None = None, dims=None,
                 external: dict | None = None) -> bytes:
    """TensorProto: raw data inline (`arr`), or only metadata pointing at external data.

    `external` = {"location": file, "offset": n, "length": n} (data_location EXTERNAL).
    """
    if arr is not None:
        arr = np.ascontiguousarray(arr)
        dtype = NUMPY_TO_ONNX[arr.dtype] if dtype is None else dtype
        dims = arr.shape
    out = b"".join(_int(1, d) for d in dims) + _int(2, dtype) + _bytes(8, name)
    if arr is not None:
        out += _bytes(9, arr.tobytes())
    if external is not None:
        out += b"".join(_bytes(13, _bytes(1, k) + _bytes(2, str(v))) for k, v in external.items())
        out += _int(14, 1)
    return out


def _attribute(name: str, value) -> bytes:
    out = _bytes(1, name)
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return out + _int(3, value) + _int(20, 2)
    if isinstance(value, (float, np.floating)):
        return out + _float(2, value) + _int(20, 1)
    if isinstance(value, (str, bytes)):
        return out + _bytes(4, value) + _int(20, 3)
    if isinstance(value, np.ndarray):
        return out + _bytes(5, tensor_proto("", value)) + _int(20, 4)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
        return out + _packed_ints(8, value) + _int(20, 7)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (float, int)) for v in value):
        return out + _bytes(7, b"".join(struct.pack("<f", v) for v in value)) + _int(20, 6)
    raise TypeError(f"attribute {name}: unsupported value {value!r}")


def _value_info(name: str, elem_type: int, shape) -> bytes:
    dims = b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in shape)
    tensor_type = _int(1, elem_type) + _bytes(2, dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


class Graph:
    """Collects nodes, initializers, inputs and outputs; node names and output names are unique."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[bytes] = []
        self.initializers: list[bytes] = []
        self.inputs: list[bytes] = []
        self.outputs: list[bytes] = []
        self._count: dict[str, int] = {}
        self.op_counts: dict[str, int] = {}

    def unique(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def reserve(self, name: str):
        """Keep `name` (an initializer added later) from being used as a node or output name."""
        self._count.setdefault(name, 1)

    def input(self, name: str, elem_type: int, shape) -> str:
        self.reserve(name)
        self.inputs.append(_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape) -> str:
        self.outputs.append(_value_info(name, elem_type, shape))
        return name

    def initializer(self, name: str, arr: np.ndarray | None = None, **kw) -> str:
        self.initializers.append(tensor_proto(name, arr, **kw))
        return name

    def const(self, base: str, arr) -> str:
        """A small inline constant (shapes, axes, scalars)."""
        return self.initializer(self.unique(base), np.asarray(arr))

    def node(self, op: str, inputs, n_out: int = 1, domain: str = "", name: str | None = None,
             outputs=None, **attrs):
        """Add a node; returns its output name (or a list when n_out > 1). '' marks a skipped input."""
        name = self.unique(name or op)
        if outputs is None:
            outputs = [name] if n_out == 1 else [f"{name}/out{i}" for i in range(n_out)]
        msg = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
        msg += _bytes(3, name) + _bytes(4, op)
        msg += b"".join(_bytes(5, _attribute(k, v)) for k, v in attrs.items() if v is not None)
        if domain:
            msg += _bytes(7, domain)
        self.nodes.append(msg)
        self.op_counts[op] = self.op_counts.get(op, 0) + 1
        return outputs[0] if n_out == 1 else list(outputs)

    def serialize(self) -> bytes:
        out = b"".join(_bytes(1, n) for n in self.nodes) + _bytes(2, self.name)
        out += b"".join(_bytes(5, t) for t in self.initializers)
        out += b"".join(_bytes(11, i) for i in self.inputs) + b"".join(_bytes(12, o) for o in self.outputs)
        return out


def model_bytes(graph: Graph, opsets: dict[str, int], producer: str = "llmpack", version: str = "",
                metadata: dict | None = None) -> bytes:
    out = _int(1, IR_VERSION) + _bytes(2, producer) + _bytes(3, version) + _bytes(7, graph.serialize())
    out += b"".join(_bytes(8, (_bytes(1, d) if d else b"") + _int(2, v)) for d, v in opsets.items())
    out += b"".join(_bytes(14, _bytes(1, k) + _bytes(2, str(v))) for k, v in (metadata or {}).items())
    return out
