"""`load(path)` -> Model: logits, token/text generation and chat over one backend."""
from __future__ import annotations

import importlib.util

import numpy as np

from llmpack.formats.errors import FormatError
from llmpack.formats.reader import Pack

from . import chat_template
from .numpy_backend import NumpyBackend
from .sampling import make_sampler
from .tokenizer import StreamDecoder, Tokenizer


def _onnxruntime_backend(pack, threads=None, **options):
    from .ort_backend import OrtBackend  # imports onnxruntime (~0.3 s) only when chosen

    return OrtBackend(pack, threads=threads, **options)


def _numpy_backend(pack, threads=None):
    return NumpyBackend(pack)  # numpy's BLAS sizes its own thread pool (OMP_NUM_THREADS)


BACKENDS = {"onnxruntime": _onnxruntime_backend, "numpy": _numpy_backend}


def default_backend() -> str:
    """onnxruntime when it is installed, else the numpy reference backend."""
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "numpy"


def load(path, backend: str | None = None, verify: bool = True, threads: int | None = None,
         context: int | None = None, **backend_options) -> "Model":
    """Memory-map a .llmpack file and build a backend over it (raises FormatError on a bad file).

    backend: "onnxruntime" (default when installed) or "numpy"; threads: compute threads
    (onnxruntime; default the number of physical cores); context: use at most this many tokens of
    the model's context (a smaller KV cache; chat and the server drop old turns sooner).
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    pack = Pack(path, verify=verify)
    if context is not None and context < 1:
        raise ValueError("the context must be at least 1 token")
    return Model(pack, BACKENDS[backend](pack, threads=threads, **backend_options), context)


class Model:
    def __init__(self, pack: Pack, backend, context: int | None = None):
        self.pack = pack
        self.header = pack.header
        self.backend = backend
        tok = pack.header["tokenizer"]  # its schema is checked by the reader (formats/schema.py)
        if not tok:
            raise FormatError(f"{pack.path}: the file has no tokenizer (a format-only file); "
                              f"convert the model with `llmpack convert`")
        self.tokenizer = Tokenizer(tok, pack.blob(tok["blob"]))
        self.chat_template = tok.get("chat_template")
        self.generation = pack.header.get("generation", {})
        self.stop_ids = self._stop_ids()
        self.context_length = min(backend.context_length, context or backend.context_length)

    def _stop_ids(self) -> set[int]:
        eos = self.generation.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        for text in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.token_to_id(text)  # end-of-turn markers of common chat formats
            if tid is not None and self.tokenizer.is_special(tid):
                ids.add(tid)
        return ids

    # -- logits ----------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Full-sequence logits (len(ids), vocab) float32 from a fresh cache."""
        return self.backend.forward(list(ids), self.backend.new_cache())

    # -- generation --------------------------------------------------------------------------
    def sampling_defaults(self) -> dict:
        g = self.generation
        if not g.get("do_sample", False):
            return {"temperature": 0.0}
        return {k: g[k] for k in ("temperature", "top_k", "top_p") if g.get(k) is not None}

    def generate_ids(self, ids, max_new_tokens: int = 128, temperature: float | None = None, top_k: int = 0,
                     top_p: float = 1.0, repeat_penalty: float = 1.0, seed: int | None = None,
                     stop: bool = True, cache=None):
        """Yield new token ids; the first comes right after the prefill (prefill and decode time apart)."""
        ids = list(ids)
        if not ids:
            raise ValueError("generation needs at least one prompt token")
        if temperature is None:
            temperature = self.sampling_defaults().get("temperature", 0.0)
        sample = make_sampler(temperature, top_k, top_p, repeat_penalty, seed)
        cache = cache if cache is not None else self.backend.new_cache()
        room = self.context_length - len(ids)
        if room <= 0:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.context_length}")
        history = list(ids)
        logits = self.backend.forward(ids[cache.length:] if cache.length else ids, cache, last_only=True)[-1]
        for _ in range(min(max_new_tokens, room)):
            tok = sample(logits, history)
            if stop and tok in self.stop_ids:
                return
            yield tok
            history.append(tok)
            logits = self.backend.forward([tok], cache, last_only=True)[-1]

    def generate(self, prompt: str, max_new_tokens: int = 128, **sampling):
        """Yield text pieces of the continuation of `prompt`."""
        ids = self.tokenizer.encode(prompt)
        yield from self._stream_text(self.generate_ids(ids, max_new_tokens, **sampling))

    def _stream_text(self, id_stream):
        dec = StreamDecoder(self.tokenizer)
        for tok in id_stream:
            piece = dec.push(tok)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    # -- chat -------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.chat_template or chat_template.FALLBACK
        return chat_template.render(template, messages, self.tokenizer.special,
                                    add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        # The template already writes BOS and other specials, so no extra special tokens here.
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False)

    def chat(self, messages: list[dict], max_new_tokens: int = 512, **sampling):
        """Yield the assistant's reply to `messages` as text pieces."""
        yield from self._stream_text(self.generate_ids(self.chat_ids(messages), max_new_tokens, **sampling))
