"""Fitting a conversation into the context: drop the oldest turns, keep the leading system message.

One rule for `llmpack chat` and the server's chat completions. Render the messages with the chat
template; if the prompt leaves room for `reserve` reply tokens, it runs whole. Otherwise the
oldest turns (a user message and everything up to the next user message) are dropped until the
prompt fills at most half of what the reserve leaves of the context (llama.cpp's context shift
likewise discards half): the next turns then re-use the KV cache instead of re-prefilling the whole context every
turn. Measured with `llmpack chat` on Qwen2.5-Coder-0.5B q4, --context 256, -n 8, 2 busy cores:
dropping just enough re-prefilled ~213 tokens (0.95 s) on every turn once the context was full
(40 turns: 43 s); dropping to half re-prefills ~77 tokens (0.4 s) once every ~6 turns (17 s).
When only the newest turn is left it runs if at least one token of room remains, else it is
refused (TooLong; the server answers 413).

A stateless client (the server gets the whole conversation with every request) is kept on the
same cut with `drop_hint`: the number of messages the previous request of the conversation
dropped; while that cut still fits it is used again, so the KV prefix of the last request stays
valid.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmpack.formats.errors import LlmpackError


class TooLong(LlmpackError):
    """The last message does not fit the context even with every older turn dropped."""


@dataclass
class Fitted:
    ids: list[int]  # the rendered prompt
    messages: list[dict]  # the messages it was rendered from (the kept system message + the newest turns)
    dropped_turns: int  # oldest turns dropped
    dropped_messages: int  # messages those turns held (after the system message)


def reply_reserve(context_length: int, max_new_tokens: int | None) -> int:
    """Room a prompt must leave: min(max_new_tokens, context/2); no limit given counts as the context."""
    return min(max_new_tokens or context_length, context_length // 2)


def fit_conversation(model, messages: list[dict], reserve: int, drop_hint: int = 0) -> Fitted:
    """Drop the oldest turns of `messages` so that model.chat_ids(...) leaves `reserve` tokens of the
    context (see the module docstring). A leading system message is kept; `messages` itself is not
    changed. drop_hint: drop that many messages (after the system message) if that fits. Raises
    TooLong when the newest turn alone leaves no room for one token (and what the template raises,
    e.g. TemplateError)."""
    ctx = model.context_length
    fixed = 1 if messages and messages[0].get("role") == "system" else 0
    ids = model.chat_ids(messages)
    if len(ids) + reserve <= ctx:
        return Fitted(ids, list(messages), 0, 0)
    if 0 < drop_hint < len(messages) - fixed and messages[fixed + drop_hint].get("role") == "user":
        kept = messages[:fixed] + messages[fixed + drop_hint:]
        hinted = model.chat_ids(kept)
        if len(hinted) + reserve <= ctx:
            return Fitted(hinted, kept, _turns(messages[fixed:fixed + drop_hint]), drop_hint)
    # turn k starts at starts[k-1]: dropping k turns keeps messages[starts[k-1]:]; the smallest k whose
    # prompt fills half the room is found by bisection (a few renders, not one per turn: the server
    # gets conversations of hundreds of turns), the prompt shrinking as turns are dropped
    starts = [i for i in range(fixed + 1, len(messages)) if messages[i].get("role") == "user"]
    rendered = {}

    def prompt(k: int) -> list[int]:
        if k not in rendered:
            rendered[k] = model.chat_ids(messages[:fixed] + messages[starts[k - 1]:])
        return rendered[k]

    target = (ctx - reserve) // 2
    lo, hi = 1, len(starts)  # the answer is in [lo, hi] if any k fits the target
    if not starts or len(prompt(hi)) > target:  # even the newest turn alone is over half the room
        k = len(starts)
        newest = prompt(k) if starts else ids
        if len(newest) >= ctx:
            raise TooLong(f"the message is too long: the prompt has {len(newest)} tokens and the model's "
                          f"context holds {ctx}")
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if len(prompt(mid)) <= target:
                hi = mid
            else:
                lo = mid + 1
        k = lo
    if k == 0:
        return Fitted(ids, list(messages), 0, 0)
    return Fitted(prompt(k), messages[:fixed] + messages[starts[k - 1]:], k, starts[k - 1] - fixed)


def _turns(messages: list[dict]) -> int:
    """Turns among dropped messages: user messages, or 1 for a run of messages before any."""
    users = sum(m.get("role") == "user" for m in messages)
    return users + (1 if messages and messages[0].get("role") != "user" else 0)
