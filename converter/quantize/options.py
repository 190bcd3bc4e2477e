"""Quantization options, their validation (one clear error each) and the per-tensor plan."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from llmpack.formats.errors import LlmpackError
from llmpack.formats.spec import GROUP_SIZES, quantized_nbytes

from . import sparsity as sparsity_mod

BITS = (8, 4, 3, 2)
METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# --keep values: a bit width, or a plain float type (the tensor is not quantized).
KEEP_VALUES = {"8": 8, "4": 4, "3": 3, "2": 2, "16": "f16", "f16": "f16", "bf16": "bf16", "32": "f32", "f32": "f32"}
# Weight matrices that are quantized (embedding and head row-wise); everything else stays float.
QUANTIZABLE = re.compile(r"(embed|head)\.weight|layers\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down))\.weight")


@dataclass
class QuantOptions:
    bits: int | None = None  # default width of quantized matrices (None: --dtype decides, unless target_bpw)
    group_size: int = 32
    group_explicit: bool = False  # --group-size given: --target-bpw then keeps it for every tensor
    method: str = "rtn"
    symmetric: bool | None = None  # None: symmetric for 8 bits, zero points below
    keep: list = field(default_factory=list)  # ["PATTERN=BITS", ...]
    target_bpw: float | None = None
    target_size: object = None  # --target-size / --plan-only: a converter.plan.SizeTarget
    calib: str | None = None
    calib_samples: int = 16
    calib_seqlen: int = 512
    seed: int = 0
    act_order: bool = True
    damp: float = 0.01
    sparsity: str | None = None  # --sparsity: "0.5" (unstructured) or "2:4"; see quantize/sparsity.py

    def __post_init__(self):
        self._keep = []
        self.sparse = None  # the parsed sparsity.Sparsity, set by validate()

    @property
    def quantized(self) -> bool:
        return self.bits is not None or self.allocated

    @property
    def calibrated(self) -> bool:
        return self.quantized and (self.method != "rtn" or self.allocated or self.sparsity is not None)

    @property
    def allocated(self) -> bool:
        """Per-tensor bits chosen from measured sensitivity (--target-bpw or --target-size)."""
        return self.target_bpw is not None or self.target_size is not None

    @property
    def uses_gptq(self) -> bool:
        return self.method in ("gptq", "awq+gptq")

    @property
    def uses_awq(self) -> bool:
        return self.method in ("awq", "awq+gptq")

    def sym(self, bits: int) -> bool:
        return (bits == 8) if self.symmetric is None else self.symmetric

    def validate(self):
        if self.bits is not None and self.bits not in BITS:
            raise LlmpackError(f"--bits {self.bits} is not supported; choose 8, 4, 3 or 2")
        if self.group_size not in GROUP_SIZES:
            raise LlmpackError(f"--group-size {self.group_size} is not supported; choose one of "
                               f"{', '.join(map(str, GROUP_SIZES))}")
        if self.method not in METHODS:
            raise LlmpackError(f"--method {self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if self.method != "rtn" and not self.quantized:
            raise LlmpackError(f"--method {self.method} needs --bits or --target-bpw")
        self.sparse = sparsity_mod.parse(self.sparsity)
        if self.sparse is not None and (self.bits is None or self.allocated):
            raise LlmpackError("--sparsity needs --bits 8/4/3/2 (and no --target-bpw): the kept weights are "
                               "stored quantized")
        if self.target_bpw is not None and not self.target_bpw > 0:
            raise LlmpackError(f"--target-bpw must be a positive number of bits per weight, got {self.target_bpw}")
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise LlmpackError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
        if not 0 <= self.damp < 1:
            raise LlmpackError(f"GPTQ damping must be in [0, 1), got {self.damp}")
        self._keep = []
        for item in self.keep:
            pat, sep, val = item.rpartition("=")
            if not sep or not pat:
                raise LlmpackError(f"--keep expects PATTERN=BITS (e.g. head=8), got {item!r}")
            if val not in KEEP_VALUES:
                raise LlmpackError(f"--keep {item}: BITS must be one of {', '.join(KEEP_VALUES)}")
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise LlmpackError(f"--keep {item}: PATTERN is not a valid regular expression ({e})")
            self._keep.append((rx, KEEP_VALUES[val]))

    def kept(self, canon: str, hf: str | None):
        """The --keep value for a tensor (matched against its llmpack and its checkpoint name), or None.
        The last matching --keep wins."""
        out = None
        for rx, val in self._keep:
            if rx.search(canon) or (hf and rx.search(hf)):
                out = val
        return out

    def describe(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method,
                "symmetric": self.symmetric, "keep": list(self.keep), "target_bpw": self.target_bpw,
                "calib": self.calib, "calib_samples": self.calib_samples, "calib_seqlen": self.calib_seqlen,
                "seed": self.seed, "act_order": self.act_order, "damp": self.damp, "sparsity": self.sparsity,
                **({"target_size": self.target_size.text} if self.target_size is not None else {})}


def tensor_bits(bits: int, shape, group_size: int, symmetric: bool) -> int:
    """Bits a quantized (N, K) tensor occupies, scales and zero points included."""
    return 8 * quantized_nbytes(f"q{bits}", tuple(shape), group_size, not symmetric)


def is_quantized(kind) -> bool:
    """A plan entry is (bits, group_size) for a quantized tensor, or a float type name."""
    return isinstance(kind, tuple)


def kind_bits(kind, shape, opts) -> int:
    """Storage bits of a tensor under a plan entry."""
    if is_quantized(kind):
        return tensor_bits(kind[0], shape, kind[1], opts.sym(kind[0]))
    return shape[0] * shape[1] * {"f32": 32, "f16": 16, "bf16": 16}[kind]


def plan_types(opts: QuantOptions, shapes: dict, hf_names: dict, dtype: str) -> dict:
    """canonical name -> storage: (bits, group size) (quantized) or a float type name, for every
    quantizable matrix; checks group size against K. (target_bpw allocation refines the
    non-kept entries later.)"""
    out = {}
    for name, shape in shapes.items():
        if not QUANTIZABLE.fullmatch(name):
            continue
        val = opts.kept(name, hf_names.get(name))
        if val is None:
            val = opts.bits if opts.bits is not None else (8 if opts.allocated else dtype)
        if isinstance(val, int):
            if shape[1] < opts.group_size:
                raise LlmpackError(f"--group-size {opts.group_size} is larger than the {shape[1]} columns of "
                                   f"{name}; use a group size of at most {shape[1]}")
            val = (val, opts.group_size)
        out[name] = val
    return out
