"""Vocabulary trimming: the embedding and head keep only the rows of the kept tokens.

The choice of tokens and the tokenizer surgery live in converter/tokenizer_trim.py (a TrimPlan,
made before the stream from the checkpoint's tokenizer and a corpus). This step gathers the rows:
`pre` the embedding (and, for a tied head, thereby the head), `post` an untied head and its bias.
It runs first among the stream's steps, so slicing, pruning and quantization see the trimmed
matrices; calibration tokens arrive in the original ids (layer dropping, which runs before the
stream, reads the untrimmed checkpoint) and are renumbered here. The runtimes read the
vocabulary size from the embedding's shape, so nothing else changes.

Qwen2.5-Coder-0.5B (untied head): 151,936 -> 32,768 rows removes 214 M of its 630 M parameters.
"""
from __future__ import annotations

import numpy as np

from ..stream import Step, Stream


class VocabTrimStep(Step):
    name = "vocab"

    def __init__(self, plan):
        self.plan = plan  # tokenizer_trim.TrimPlan

    def options(self) -> dict:
        p = self.plan
        return {"size": int(len(p.kept)), "removed": int(p.rows - len(p.kept)), "protected": p.protected,
                "corpus": p.corpus}

    def pre(self, s: Stream, pre: dict):
        pre["embed.weight"] = np.ascontiguousarray(pre["embed.weight"][self.plan.kept])
        if s.ids is not None:
            s.ids = self.plan.new_of_old[s.ids]
            assert (s.ids >= 0).all(), "calibration tokens come from the trimmed tokenizer"

    def post(self, s: Stream, post: dict, x):
        for name in ("head.weight", "head.bias"):
            if name in post:
                post[name] = np.ascontiguousarray(post[name][self.plan.kept])
