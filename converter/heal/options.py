"""--heal options, validated before any work (one line each)."""
from __future__ import annotations

from dataclasses import dataclass

from llmpack.formats.errors import LlmpackError

DEVICES = ("cpu", "cuda")
AUTO_CAP = 65536  # --heal-tokens auto: at most this many tokens per block and end to end
HELD_OUT = 8  # --heal-tokens auto: one calibration row in HELD_OUT (at least one) is held out


@dataclass
class HealOptions:
    tokens: int = 32768  # training tokens of each phase (phase 1: per block); with until_flat, the cap
    # --heal-tokens auto: each block and the end-to-end phase train in rounds (one pass over the
    # training rows) until two rounds in a row each lower the error on held-out calibration rows
    # by less than min_gain, keeping the best round (train.UntilFlat); `tokens` caps each
    # (AUTO_CAP). The budget then goes where the error still falls rather than the same to
    # every block (docs/healing.md: Qwen's blocks trained 4 to 32 steps).
    until_flat: bool = False
    min_gain: float = 0.01  # relative: a round must cut the held-out error by 1 % to count
    device: str = "cpu"
    batch: int = 4  # sequences per step of the end-to-end phase
    # Block-wise sequences a step. On block 0 of the off-grid Qwen 0.5B at q2 GPTQ (16384 tokens,
    # held-out sequences) one a step at 2e-2 beat four at 1e-2 (error 0.0748 against 0.0868), but
    # the whole q3 GPTQ model healed that way measured worse on the GNU text (KLD 0.1796 against
    # 0.1619): 32 steps over 16 calibration sequences fit the calibration text (its own KL was
    # lower, 0.0367 against 0.0391). Four a step stays the default (docs/healing.md).
    block_batch: int = 4
    # Adam learning rates (see fakequant.py for the parametrization). Measured on block 0 of
    # the off-grid Qwen 0.5B at q2 GPTQ, 12 steps of 4 x 512 tokens, relative error 0.110 ->
    # scales 1e-3: 0.103; 1e-2 (+ norms 1e-3): 0.077. Learned rounding (STE codes) moved no
    # code at 1e-2 or 3e-2 (no offset reaches 0.5 in 12 steps) and flipped codes en masse at
    # 0.1 (error 0.11 -> 1.46): Adam moves every offset alike. Off by default (0: the codes
    # stay GPTQ's); worth a try with thousands of steps on a GPU.
    lr_weight: float = 0.0  # rounding offsets, in code steps
    lr_scale: float = 1e-2  # log-scales: relative change
    lr_float: float = 1e-3  # norms and biases
    lr_matrix: float = 1e-4  # float weight matrices (pruned f16 models; tiny llama pruned 50 %: held-out KLD -4 % at 1e-5, -21 % at 1e-4)
    # end to end (the whole file; scales and norms only): lower, the KL it starts from is
    # small and every block moves at once (tiny pruned llama: 1e-3 on norms raised it 1.3e-5 -> 1.6e-5)
    e2e_lr_scale: float = 1e-3
    e2e_lr_float: float = 1e-4
    top_k: int = 64  # teacher log-probabilities kept per token for phase 2 (plus the tail's mass)
    phases: tuple = ("block", "e2e")
    seed: int = 0
    save_every: float = 120.0  # seconds between the end-to-end phase's checkpoints

    @classmethod
    def auto(cls, **kw) -> "HealOptions":
        return cls(tokens=AUTO_CAP, until_flat=True, **kw)

    def validate(self):
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise LlmpackError(f"--heal-tokens {self.tokens}: give a positive number of training tokens, or auto")
        if self.device not in DEVICES:
            raise LlmpackError(f"--heal-device {self.device!r}: choose cpu or cuda")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise LlmpackError("--heal-device cuda: torch sees no CUDA GPU here; use --heal-device cpu")

    def describe(self) -> dict:
        return {"tokens": self.tokens, "until_flat": self.until_flat, "device": self.device, "batch": self.batch, "block_batch": self.block_batch,
                "phases": list(self.phases),
                "lr": {"rounding": self.lr_weight, "scale": self.lr_scale, "float": self.lr_float,
                       "matrix": self.lr_matrix, "e2e_scale": self.e2e_lr_scale, "e2e_float": self.e2e_lr_float},
                "top_k": self.top_k}
