"""One recipe drives a conversion: which steps run, in which order, with which options.

    read -> [plan for a size] -> [drop layers] -> [trim vocabulary] -> [slice] -> [prune heads / MLP]
         -> [tie the head] -> [quantize] -> [heal] -> write -> [evaluate, after each step too]

Options are validated here, before any work, each failure one line naming the option and the
fix; the recipe as run (each step and its options) is recorded in the file's header.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmpack.formats.errors import LlmpackError

from .heal.options import HealOptions
from .quantize.options import QuantOptions

DTYPES = ("f32", "f16", "bf16", "q8")


@dataclass
class StructureOptions:
    slice: float | None = None  # fraction of the residual width removed (SliceGPT)
    prune_mlp: float | None = None  # fraction of MLP neurons removed per block
    prune_heads: float | None = None  # KV groups removed per block: a count (>= 1) or a fraction (< 1)
    drop_layers: int | None = None  # whole blocks removed

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.slice, self.prune_mlp, self.prune_heads, self.drop_layers))

    def validate(self):
        if self.slice is not None and not 0 <= self.slice < 1:
            raise LlmpackError(f"--slice {self.slice}: give the fraction of the hidden size to remove, in [0, 1)")
        if self.prune_mlp is not None and not 0 <= self.prune_mlp < 1:
            raise LlmpackError(f"--prune-mlp {self.prune_mlp}: give the fraction of MLP neurons to remove, in [0, 1)")
        h = self.prune_heads
        if h is not None and not (0 <= h < 1 or (h >= 1 and float(h).is_integer())):
            raise LlmpackError(f"--prune-heads {h}: give a whole number of KV head groups per layer or a "
                               f"fraction in [0, 1)")
        if self.drop_layers is not None and self.drop_layers < 0:
            raise LlmpackError(f"--drop-layers {self.drop_layers}: give a number of layers >= 0")

    def check_model(self, model: dict, shapes: dict, family: str):
        """Checks that need the model: counts against its layers and heads."""
        n = model["n_layers"]
        if self.drop_layers is not None and self.drop_layers >= n:
            raise LlmpackError(f"--drop-layers {self.drop_layers}: the model has {n} layers; drop at most {n - 1}")
        if self.slice is not None and model.get("sandwich_norms"):
            raise LlmpackError(f"--slice: {family}'s norms after each attention and MLP output (sandwich norms) "
                               f"do not commute with SliceGPT's rotation; slice llama, mistral, qwen2, phi, opt "
                               f"or gpt2 models")
        if self.prune_heads is not None and self.prune_heads >= 1:
            hd = model["head_dim"]
            n_kv = min(shapes[f"layers.{i}.attn.k.weight"][0] // hd for i in range(n))
            if self.prune_heads >= n_kv:
                raise LlmpackError(f"--prune-heads {int(self.prune_heads)}: layers have {n_kv} KV head groups; "
                                   f"remove at most {n_kv - 1}")

    def describe(self) -> dict:
        return {k: v for k, v in (("slice", self.slice), ("prune_mlp", self.prune_mlp),
                                  ("prune_heads", self.prune_heads), ("drop_layers", self.drop_layers))
                if v is not None}


@dataclass
class VocabOptions:
    size: int | None = None  # --vocab-size N: rows kept in the embedding and head
    corpus: list | None = None  # --vocab-from FILE...: the text the tokens are counted on

    @property
    def active(self) -> bool:
        return self.size is not None or self.corpus is not None

    def validate(self):
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise LlmpackError(f"--vocab-size {self.size}: give the number of tokens to keep, a whole number >= 1")
        for f in self.corpus or []:
            if not Path(f).is_file():
                raise LlmpackError(f"--vocab-from {f}: no such file; give text files to count tokens on")

    def check_model(self, protected: int, rows: int):
        """Against the model: `protected` ids (specials, byte alphabet, closed under merges) must stay."""
        if self.size is None:
            return
        if self.size >= rows:
            raise LlmpackError(f"--vocab-size {self.size}: the model has {rows} tokens; give fewer than {rows} "
                               f"(or drop --vocab-size)")
        if self.size < protected:
            raise LlmpackError(f"--vocab-size {self.size}: the special tokens and byte alphabet alone are "
                               f"{protected} tokens; the smallest allowed --vocab-size is {protected}")

    def texts(self) -> tuple[list[str], str]:
        """The corpus (its texts and a name for the record): the FILEs, else the shipped calibration text."""
        from .quantize import calib

        if not self.corpus:
            return [calib.default_text()], f"default:{calib.DEFAULT_NAME}"
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in self.corpus]
        return texts, ",".join(Path(f).name for f in self.corpus)


@dataclass
class Recipe:
    dtype: str = "f16"
    quant: QuantOptions = field(default_factory=QuantOptions)
    structure: StructureOptions = field(default_factory=StructureOptions)
    eval_text: str | None = None
    eval_windows: int = 16
    eval_ctx: int = 512
    sensitivity_file: str | None = None
    heal: HealOptions | None = None
    vocab: VocabOptions = field(default_factory=VocabOptions)
    plan_only: bool = False  # --plan-only: print the size/KLD frontier, write no pack
    keep_vocab: bool = False  # --keep-vocab: the planner does not weigh trimming the vocabulary
    tie_head: bool = False  # --tie-head: store an untied head as the embedding times a fitted map
    search_structure: bool = False  # --search-structure: the planner also weighs dropping blocks and pruning

    @property
    def calibrated(self) -> bool:
        return self.quant.calibrated or self.structure.any or self.heal is not None

    @classmethod
    def from_options(cls, dtype: str = "f16", group_size: int | None = None, bits: int | None = None,
                     method: str = "rtn", keep=(), target_bpw: float | None = None, calib=None,
                     calib_samples: int = 16, calib_seqlen: int = 512, seed: int = 0,
                     symmetric: bool | None = None, act_order: bool = True, damp: float = 0.01,
                     eval_text=None, eval_windows: int = 16, eval_ctx: int = 512, sensitivity_file=None,
                     slice=None, prune_mlp=None, prune_heads=None, drop_layers=None, sparsity=None,
                     heal: bool = False, heal_tokens: int | None = None, heal_device: str | None = None,
                     vocab_size=None, vocab_from=None, target_size=None,
                     plan_only: bool = False, keep_vocab: bool = False, tie_head: bool = False,
                     search_structure: bool = False) -> "Recipe":
        """The keyword options of `convert()` / the CLI, validated (LlmpackError on the first bad one)."""
        if dtype not in DTYPES:
            raise LlmpackError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if dtype == "q8":
            if bits not in (None, 8):
                raise LlmpackError(f"--dtype q8 contradicts --bits {bits}; give only --bits")
            bits, dtype = 8, "f16"
        quant = QuantOptions(bits=bits, group_size=group_size or 32, group_explicit=group_size is not None,
                             method=method, symmetric=symmetric, keep=list(keep or ()), target_bpw=target_bpw,
                             calib=None if calib is None else str(calib), calib_samples=calib_samples,
                             calib_seqlen=calib_seqlen, seed=seed, act_order=act_order, damp=damp,
                             sparsity=sparsity)
        if target_size is not None or plan_only:  # --target-size / --plan-only (converter/plan.py)
            from .plan import parse_size

            if target_bpw is not None or bits is not None:
                raise LlmpackError(f"--target-size/--plan-only choose the bits per tensor; drop "
                                   f"{'--target-bpw' if target_bpw is not None else '--bits (or --dtype q8)'}")
            quant.target_size = parse_size(target_size)
        quant.validate()
        structure = StructureOptions(slice, prune_mlp, prune_heads, drop_layers)
        structure.validate()
        if structure.any and quant.allocated:
            raise LlmpackError("--target-bpw/--target-size measure the unpruned model; combine slicing/pruning "
                               "with --bits instead")
        vocab = VocabOptions(vocab_size, [str(f) for f in vocab_from] if vocab_from else None)
        vocab.validate()
        if vocab.active and quant.target_bpw is not None:
            raise LlmpackError("--target-bpw measures the untrimmed vocabulary; combine --vocab-size with --bits or "
                               "--target-size instead")
        if keep_vocab and (quant.target_size is None or vocab.active):
            raise LlmpackError("--keep-vocab tells --target-size/--plan-only not to trim the vocabulary; use it "
                               "with one of them and without --vocab-size/--vocab-from")
        if search_structure and quant.target_size is None:
            raise LlmpackError("--search-structure tells --target-size/--plan-only to weigh dropping blocks and "
                               "pruning; use it with one of them (or give --drop-layers/--prune-mlp with --bits)")
        if heal and plan_only:
            raise LlmpackError("--plan-only writes no file, so there is nothing to heal; drop --heal or --plan-only")
        if sensitivity_file is not None:
            if not quant.allocated:
                raise LlmpackError("--sensitivity only applies with --target-bpw or --target-size; add one or drop it")
            if not Path(sensitivity_file).parent.is_dir():
                raise LlmpackError(f"--sensitivity {sensitivity_file}: no such folder {Path(sensitivity_file).parent}")
        return cls(dtype, quant, structure, eval_text, eval_windows, eval_ctx, sensitivity_file,
                   _heal_options(heal, heal_tokens, heal_device, quant, structure, dtype, seed), vocab,
                   plan_only, keep_vocab, bool(tie_head), bool(search_structure))


def _heal_options(heal, tokens, device, quant: QuantOptions, structure: StructureOptions, dtype: str, seed: int):
    if not heal:
        if tokens is not None or device is not None:
            raise LlmpackError("--heal-tokens and --heal-device only apply with --heal; add --heal")
        return None
    if not quant.quantized and not structure.any:
        raise LlmpackError(f"--heal: nothing to heal in a {dtype} file; add --bits, --sparsity or a structure "
                           f"option (--slice, --prune-mlp, --prune-heads, --drop-layers)")
    opts = HealOptions.auto(seed=seed) if tokens == "auto" else HealOptions(seed=seed)
    if tokens not in (None, "auto"):
        opts.tokens = tokens
    if device is not None:
        opts.device = device
    opts.validate()
    return opts
