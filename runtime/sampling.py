"""Token samplers, made by a function so the generation loop stays one line per step."""
from __future__ import annotations

import numpy as np


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repeat_penalty: float = 1.0, seed: int | None = None):
    """Return sample(logits (V,), history list[int]) -> token id. temperature 0 = greedy."""
    rng = np.random.default_rng(seed)
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or repeat_penalty <= 0:
        raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repeat_penalty > 0")

    def sample(logits: np.ndarray, history) -> int:
        logits = np.asarray(logits, np.float64)
        if repeat_penalty != 1.0 and len(history):
            # CTRL-style, as transformers and llama.cpp: shrink seen tokens' logits toward "less likely".
            seen = np.unique(np.asarray(history, np.int64))
            vals = logits[seen]
            logits = logits.copy()
            logits[seen] = np.where(vals > 0, vals / repeat_penalty, vals * repeat_penalty)
        if temperature == 0:
            return int(np.argmax(logits))
        logits = logits / temperature
        if top_k and top_k < logits.shape[0]:
            kth = np.partition(logits, -top_k)[-top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, top_p)) + 1]  # smallest set reaching top_p
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(rng.choice(probs.shape[0], p=probs))

    return sample
