"""Write one tensor as the storage plan says: quantized (RTN), a float type, or f32."""
from __future__ import annotations

import numpy as np

from llmpack.formats import quant

from .options import is_quantized


def store(writer, name: str, arr: np.ndarray, types: dict, opts, float_dtype: str, importance=None):
    """Quantized (RTN) for a (bits, group) plan entry, the plan's float type, f32 for vectors and
    tables (norms, biases, RoPE: tiny, kept exact), else `float_dtype`."""
    kind = types.get(name)
    if is_quantized(kind):
        bits, g = kind
        writer.add(name, f"q{bits}", arr.shape,
                   quant.quantize_rtn(arr, bits, g, opts.sym(bits), importance=importance), group_size=g)
        return
    if kind is not None:
        writer.add_array(name, arr, kind)
    elif arr.ndim != 2 or name.startswith("rope."):
        writer.add_array(name, arr, "f32")
    else:
        writer.add_array(name, arr, float_dtype)
