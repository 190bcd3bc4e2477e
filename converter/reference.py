"""The transformers model itself as the reference for `eval` / `convert --eval-text`: float32
full-sequence logits. Lives on the converter side because it imports torch."""
from __future__ import annotations

import numpy as np

from llmpack.formats.errors import LlmpackError


def hf_logits_fn(folder, quiet: bool = False):
    """Full-sequence logits of a transformers checkpoint folder (float32, torch imported here)."""
    model = hf_model(folder, quiet)
    import torch

    def fn(ids):
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(ids)[None])).logits[0].float().numpy()

    return fn


def hf_model(folder, quiet: bool = False):
    """The transformers model of a checkpoint folder, float32, eval mode (torch imported here)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise LlmpackError("a transformers folder as reference needs torch and transformers: "
                           "pip install 'llmpack[convert]', or pass an f32 .llmpack as reference")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_tokenizer(folder):
    """The folder's tokenizer as the runtime runs it (the reference's own tokenization for `eval`)."""
    from llmpack.runtime.tokenizer import Tokenizer

    from .checkpoint import Checkpoint
    from .tokenizer_files import collect

    section, _, blob = collect(Checkpoint(folder))
    return Tokenizer(section, blob)
