"""Quantized linears that train on exactly the grid the file stores.

The runtime computes a quantized weight as (code - zero) * scale, code and zero integers, the
scale an f16 per group (formats/quant.py). Healing trains that same formula:

- `LatentQuant` (block-wise phase): learnable rounding offsets around the stored codes and
  learnable scales, straight-through rounding (AutoRound's parametrization; EfficientQAT's
  Block-AP trains raw latent weights, which a few CPU steps cannot do safely, see the class).
- `FixedCodes` (end-to-end phase, and sparse tensors everywhere): the codes and zero points stay
  as stored, only the scales learn (EfficientQAT's E2E-QP); pruned weights hold their group's
  zero point, so they stay exactly zero.

In both, the scale is rounded to f16 in the forward (straight-through), so the weight used in
training equals `quant.dequantize` of the exported parts bit for bit (a test, for every type).
"""
from __future__ import annotations

import numpy as np
import torch

from llmpack.formats import quant, sparse
from llmpack.formats.spec import STORAGE_TYPES


def round_ste(x):
    return x + (torch.round(x) - x).detach()


def f16_ste(x):
    return x + (x.half().float() - x).detach()


class _Quant(torch.nn.Module):
    """Shared: shape (N, K), bits, group g, storage type, the stored parts it came from, and the
    learnable scale s = s0 * exp(r) (r starts at 0: learning rates are relative, so one rate
    suits every tensor whatever its scale's magnitude)."""

    def __init__(self, typ: str, shape, g: int, parts: dict, nnz):
        super().__init__()
        self.typ, self.shape, self.g, self.nnz = typ, tuple(shape), g, nnz
        self.bits = STORAGE_TYPES[typ].bits
        self.qmax = (1 << self.bits) - 1
        self.sparse = STORAGE_TYPES[typ].sparse is not None
        dense = sparse.expand(parts, typ, shape, g, nnz) if self.sparse else parts
        codes, scales, zp = quant.decode(dense, self.shape, self.bits, g)
        self.has_zeros = "zeros" in parts
        self.parts = parts  # the stored parts (sparse ones keep their index or mask)
        self.register_buffer("s0", torch.from_numpy(scales.copy()))  # (N, G) f16 values in f32
        self.r = torch.nn.Parameter(torch.zeros_like(self.s0))  # log of the scale's change
        self.register_buffer("zp", torch.from_numpy(zp.copy()))  # (N, G)
        self._codes0 = codes  # (N, K) uint8

    def scale(self):
        """The f16 scale (N, G) the file will store (straight-through rounding)."""
        return f16_ste(self.s0 * torch.exp(self.r))

    def _expand(self, t):  # (N, G) -> (N, G*g) -> (N, K)
        return t.repeat_interleave(self.g, dim=1)[:, : self.shape[1]]

    def weight(self):
        raise NotImplementedError

    def codes(self) -> np.ndarray:
        raise NotImplementedError

    def export(self) -> dict:
        """The stored parts of the trained tensor (same type, same layout)."""
        with torch.no_grad():
            scales = self.scale().cpu().numpy().astype(np.float16)
        if self.sparse:  # codes unchanged: only the scales part differs
            return {**self.parts, "scales": scales}
        zeros = self.zp.cpu().numpy().astype(np.uint8) if self.has_zeros else None
        return quant.encode(self.codes(), scales, zeros, self.bits, self.g)


class FixedCodes(_Quant):
    """Stored codes and zero points; learnable f16 scales."""

    def __init__(self, typ: str, shape, g: int, parts: dict, nnz=None):
        super().__init__(typ, shape, g, parts, nnz)
        self.register_buffer("q", torch.from_numpy(self._codes0.astype(np.float32)) - self._expand(self.zp))
        del self._codes0

    def weight(self):
        return self.q * self._expand(self.scale())

    def codes(self) -> np.ndarray:
        return (self.q + self._expand(self.zp)).round().cpu().numpy().astype(np.uint8)


class LatentQuant(_Quant):
    """Learnable rounding: code = clamp(round(c0 + v), 0, 2^b - 1) with v in [-1, 1] (the
    stored code c0 may move one step either way), straight-through; learnable scales. The
    offset v is in code units (AutoRound's parametrization, widened from its +-0.5 around the
    float weight to +-1 around GPTQ's code): Adam on raw latent weights moved every weight by
    the same absolute amount, flipped whole rows of codes whose scale was small and doubled
    a Qwen block's error in 5 steps; v bounds and normalizes the move."""

    def __init__(self, typ: str, shape, g: int, parts: dict, nnz=None):
        super().__init__(typ, shape, g, parts, nnz)
        if self.sparse:
            raise ValueError("sparse tensors heal with FixedCodes")
        self.register_buffer("c0", torch.from_numpy(self._codes0.astype(np.float32)))
        del self._codes0
        self.v = torch.nn.Parameter(torch.zeros_like(self.c0))

    def _codes(self):
        return torch.clamp(round_ste(self.c0 + self.v), 0, self.qmax)

    def weight(self):
        return (self._codes() - self._expand(self.zp)) * self._expand(self.scale())

    def codes(self) -> np.ndarray:
        with torch.no_grad():
            return self._codes().cpu().numpy().astype(np.uint8)

    def clamp_(self):
        with torch.no_grad():
            self.v.clamp_(-1.0, 1.0)


def make(typ: str, shape, g: int, parts: dict, nnz=None, latent: bool = True) -> _Quant:
    """The trainable form of a stored quantized tensor."""
    if latent and STORAGE_TYPES[typ].sparse is None:
        return LatentQuant(typ, shape, g, parts, nnz)
    return FixedCodes(typ, shape, g, parts, nnz)
