"""A block's (or a file's) tensors as trainable torch parameters, and back to stored form.

Each tensor trains in the form it will be stored in: a quantized linear through
fakequant (codes on the file's grid), a float matrix rounded to its storage type (f16/bf16,
straight-through) in every forward, norms and biases (stored as f32) as they are.
"""
from __future__ import annotations

import numpy as np
import torch

from llmpack.formats import sparse

from . import fakequant


def round_to(dtype: str):
    """The forward rounding of a float matrix stored as `dtype` (straight-through)."""
    if dtype == "f16":
        return fakequant.f16_ste
    if dtype == "bf16":
        return lambda x: x + (x.bfloat16().float() - x).detach()
    return lambda x: x


class FloatWeight(torch.nn.Module):
    def __init__(self, arr: np.ndarray, dtype: str):
        super().__init__()
        self.W = torch.nn.Parameter(torch.from_numpy(np.array(arr, np.float32)))
        self.rounding, self.dtype = round_to(dtype), dtype

    def weight(self):
        return self.rounding(self.W)

    def value(self) -> np.ndarray:
        with torch.no_grad():
            return self.weight().cpu().numpy()


class Params:
    """name -> a module with .weight() (quantized or float matrices) or a plain tensor."""

    def __init__(self, device):
        self.device = device
        self.mods: dict = {}
        self.vecs: dict = {}
        self.frozen: dict = {}

    def quantized(self, name, typ, shape, g, parts, nnz, latent: bool):
        self.mods[name] = fakequant.make(typ, shape, g, parts, nnz, latent=latent).to(self.device)

    def float_matrix(self, name, arr, dtype):
        self.mods[name] = FloatWeight(arr, dtype).to(self.device)

    def vector(self, name, arr):
        self.vecs[name] = torch.nn.Parameter(torch.from_numpy(np.array(arr, np.float32)).to(self.device))

    def fixed(self, name, arr):
        self.frozen[name] = torch.from_numpy(np.array(arr, np.float32)).to(self.device)  # a copy: packs are read-only

    def __call__(self, name):
        m = self.mods.get(name)
        if m is not None:
            return m.weight()
        v = self.vecs.get(name)
        return v if v is not None else self.frozen.get(name)

    def groups(self, lr_weight, lr_scale, lr_float, lr_matrix) -> list:
        """[(params, lr)]: rounding offsets (code units), log-scales (relative), norms and
        biases, float matrices (absolute: EfficientQAT's 2e-5 order)."""
        w, q, m_, f = [], [], [], list(self.vecs.values())
        for m in self.mods.values():
            if isinstance(m, FloatWeight):
                m_.append(m.W)
            else:
                q.append(m.r)
                if isinstance(m, fakequant.LatentQuant):
                    w.append(m.v)
        return [(w, lr_weight), (q, lr_scale), (f, lr_float), (m_, lr_matrix)]

    def clamp(self):
        """Rounding offsets stay within one code step of the stored code."""
        for m in self.mods.values():
            if isinstance(m, fakequant.LatentQuant):
                m.clamp_()

    def stored(self, name) -> tuple:
        """('q', typ, shape, g, parts, nnz) | ('f', array) — what the file will hold for `name`."""
        m = self.mods.get(name)
        if m is None:
            return "f", self.vecs[name].detach().cpu().numpy()
        if isinstance(m, FloatWeight):
            return "f", m.value()
        return "q", m.typ, m.shape, m.g, m.export(), m.nnz


def dequantized(typ, shape, g, parts, nnz) -> np.ndarray:
    """The runtime's float weights of stored parts."""
    return sparse.dequantize(parts, typ, shape, g, nnz)
