"""Fitting a conversation into the context: drop the oldest turns, keep the leading system message.

One rule for `llmpack chat` and the server's chat completions: render the messages with the chat
template; while the prompt leaves less than `reserve` tokens for the reply, drop the oldest turn
(its user message and everything up to the next user message). When only the last user message
(and the system message) is left, it is accepted if at least one token of room remains, else it
is refused (TooLong; the server answers 413).
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
    dropped_messages: int  # messages those turns held


def reply_reserve(context_length: int, max_new_tokens: int | None) -> int:
    """Room a prompt must leave: min(max_new_tokens, context/2); no limit given counts as the context."""
    return min(max_new_tokens or context_length, context_length // 2)


def fit_conversation(model, messages: list[dict], reserve: int) -> Fitted:
    """Drop the oldest turns of `messages` until model.chat_ids(...) + reserve fits model.context_length.

    A leading system message is kept. `messages` itself is not changed. Raises TooLong when the last
    turn alone leaves no room for even one token (and what the template raises, e.g. TemplateError).
    """
    ctx = model.context_length
    kept = list(messages)
    fixed = 1 if kept and kept[0].get("role") == "system" else 0
    dropped = 0
    while True:
        ids = model.chat_ids(kept)
        if len(ids) + reserve <= ctx:
            break
        # the oldest turn: its user message and everything up to the next user message
        nxt = next((i for i in range(fixed + 1, len(kept)) if kept[i].get("role") == "user"), None)
        if nxt is None:  # only the newest turn is left
            if len(ids) < ctx:
                break
            raise TooLong(f"the message is too long: the prompt has {len(ids)} tokens and the model's "
                          f"context holds {ctx}")
        del kept[fixed:nxt]
        dropped += 1
    return Fitted(ids, kept, dropped, len(messages) - len(kept))
