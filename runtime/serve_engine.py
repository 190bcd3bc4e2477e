"""The server's generation engine: one model, one KV cache, one generation at a time.

A laptop CPU has 2-8 cores and one decode step already uses them all (onnxruntime's thread pool),
so requests queue on a single worker thread instead of running side by side: a second stream
would only halve both speeds and double the KV memory. The worker keeps one cache and re-uses
the longest token prefix a request shares with the previous one (the next turn of a
conversation prefills only its new tokens, as `llmpack chat` does). A conversation longer than
the context loses its oldest turns (the system message stays), by the rule `llmpack chat` uses
(runtime/history.py). Every request carries a cancel flag, checked after each token: a client
that goes away stops its generation at the next token, and a cancelled request still waiting in
the queue never starts.

The worker reports through `emit(event)`, called on the worker thread:
    ("prompt", n_tokens, n_reused, n_dropped) the prompt fits and generation starts (n_reused tokens
                                  from the cache; n_dropped oldest messages left out to fit the context)
    ("text", piece)               the next piece of text (never half a character, never past a stop string)
    ("end", finish_reason, n)     "stop" | "length" | "cancelled", and the number of generated tokens
    ("error", status, message)    the request could not run (400 bad conversation, 413 too long, 500)
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from llmpack.formats.errors import LlmpackError

from .history import TooLong, fit_conversation, reply_reserve
from .prefix_cache import PrefixCache
from .tokenizer import StreamDecoder


@dataclass
class Job:
    """One generation request. `prompt` is text (encoded with the tokenizer's special tokens, as
    `llmpack generate` does), a token id list, or `messages` (rendered with the chat template)."""

    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None  # None: up to the end of the context
    sampling: dict = field(default_factory=dict)  # temperature, top_k, top_p, repeat_penalty, seed
    stop: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)


class StopText:
    """Text pieces of a token stream, cut at the first stop string. Text that could be the start
    of a stop string is held back until the next tokens decide it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # characters of self.text already released

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text to release, whether a stop string was reached)."""
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def flush(self) -> tuple[str, bool]:
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        end, stopped = (min(hits), True) if hits else (len(self.text) - (0 if final else self._held()), False)
        piece = self.text[self.sent:end]
        self.sent = end
        return piece, stopped

    def _held(self) -> int:
        """Length of the longest tail of the unreleased text that begins some stop string."""
        tail = self.text[self.sent:]
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if s.startswith(tail[-k:])), default=0)


class Engine:
    """Runs Jobs one at a time on a worker thread over a model with one re-used KV cache."""

    def __init__(self, model):
        self.model = model
        self.kv = PrefixCache(model.backend)
        self.dropped_head: list[dict] = []  # the last conversation's system message and dropped messages
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmpack-generate")
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}  # requests by how they ended

    def submit(self, job: Job, emit: Callable[[tuple], None]) -> Future:
        return self.worker.submit(self.run, job, emit)

    def close(self):
        self.worker.shutdown(wait=False, cancel_futures=True)

    def run(self, job: Job, emit: Callable[[tuple], None]):
        """Run one job to its end, reporting through emit (see the module docstring)."""
        try:
            event = self._run(job, emit)
        except Exception as e:  # noqa: BLE001 - a bug or a backend failure: the server keeps serving
            self.kv = PrefixCache(self.model.backend)
            event = ("error", 500, f"generation failed: {e.__class__.__name__}: {e}")
        self.finished[event[1] if event[0] == "end" else "error"] += 1
        emit(event)

    def _run(self, job: Job, emit) -> tuple:
        if job.cancel.is_set():
            return "end", "cancelled", 0
        try:
            ids, dropped = self.prompt_ids(job)
        except TooLong as e:
            return "error", 413, f"{e}; shorten the last message"
        except (LlmpackError, ValueError, TypeError) as e:
            return "error", 400, str(e)
        room = self.model.context_length - len(ids)
        if room <= 0:
            return "error", 413, (f"the prompt has {len(ids)} tokens and the model's context holds "
                                  f"{self.model.context_length}; shorten the prompt")
        reused = self.kv.prepare(ids)
        emit(("prompt", len(ids), reused, dropped))
        finish, n = self.generate(ids, job, min(job.max_tokens or room, room), emit)
        return "end", finish, n

    def prompt_ids(self, job: Job) -> tuple[list[int], int]:
        """(prompt ids, messages dropped): a conversation loses its oldest turns until it leaves room
        for min(max_tokens, context/2) tokens, as in `llmpack chat` (runtime/history.py); raises
        TooLong when even its last turn does not fit. A text or token prompt is taken whole."""
        if job.messages is not None:
            reserve = reply_reserve(self.model.context_length, job.max_tokens)
            fitted = fit_conversation(self.model, job.messages, reserve, self._drop_hint(job.messages))
            fixed = 1 if job.messages[0].get("role") == "system" else 0
            self.dropped_head = job.messages[:fixed + fitted.dropped_messages]
            return fitted.ids, fitted.dropped_messages
        if isinstance(job.prompt, list):
            vocab = self.model.tokenizer.vocab_size
            if not job.prompt or any(not 0 <= t < vocab for t in job.prompt):
                raise LlmpackError(f"prompt token ids must be a non-empty list of ids in [0, {vocab})")
            return list(job.prompt), 0
        ids = self.model.tokenizer.encode(job.prompt)
        if not ids:
            raise LlmpackError("the prompt is empty: give at least one token of text")
        return ids, 0

    def _drop_hint(self, messages: list[dict]) -> int:
        """How many messages the last request dropped, if this one continues its conversation (starts
        with the same system message and dropped messages): cutting there again keeps its KV prefix."""
        head = self.dropped_head
        fixed = 1 if head and head[0].get("role") == "system" else 0
        return len(head) - fixed if len(head) > fixed and messages[:len(head)] == head else 0

    def generate(self, ids: list[int], job: Job, limit: int, emit) -> tuple[str, int]:
        """Generate up to `limit` tokens after kv.prepare(ids); returns (finish_reason, number generated)."""
        text = StopText(self.model.tokenizer, job.stop)
        generated: list[int] = []
        try:
            for tok in self.model.generate_ids(ids, limit, cache=self.kv.cache, **job.sampling):
                generated.append(tok)
                piece, stopped = text.push(tok)
                if piece:
                    emit(("text", piece))
                if stopped or job.cancel.is_set():
                    return ("stop" if stopped else "cancelled"), len(generated)
            piece, stopped = text.flush()
            if piece:
                emit(("text", piece))
            return ("stop" if stopped or len(generated) < limit else "length"), len(generated)
        finally:
            self.kv.commit(ids, generated)
