"""The OpenAI wire format: request bodies -> Jobs (checked field by field) and Job events -> response
bodies, for /v1/chat/completions and /v1/completions. No HTTP here (runtime/server.py does that).

Fields: messages | prompt, max_tokens (or max_completion_tokens), temperature, top_p, top_k,
repeat_penalty, seed, stop (a string or a list), stream, stream_options.include_usage, n (only 1).
`temperature` left out means the model's own generation_config (greedy when it has none), as in
`llmpack generate`. max_tokens left out, or more than the context has room for, means up to the
end of the context (finish_reason "length"). A conversation that does not leave room for
min(max_tokens, context/2) tokens loses its oldest turns (the leading system message stays; usage
says how many messages were dropped: "dropped_messages", also the X-Llmpack-Dropped-Messages
header); a last message, or a text prompt, that leaves no room is refused (413).
"model" is not checked: the server has one model. frequency/presence penalties and logprobs are
not implemented: a non-zero or true value is refused (400) rather than silently ignored.
"""
from __future__ import annotations

import time
import uuid

from .serve_engine import Job


class BadRequest(ValueError):
    """A request the server refuses with status 400 (the message names the field)."""


def _typed(body: dict, name: str, types, check=None, rule: str = ""):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest(f"'{name}' must be {rule or types.__name__}, not a boolean")
    if not isinstance(value, types) or (check and not check(value)):
        raise BadRequest(f"'{name}' must be {rule or getattr(types, '__name__', types)}; got {value!r}"[:300])
    return value


def sampling(body: dict) -> dict:
    """The sampling fields, checked; keys as Model.generate_ids takes them."""
    out = {}
    rules = {"temperature": ((int, float), lambda v: 0 <= v <= 100, "a number >= 0"),
             "top_p": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
             "top_k": (int, lambda v: v >= 0, "an integer >= 0"),
             "repeat_penalty": ((int, float), lambda v: v > 0, "a number > 0"),
             "seed": (int, None, "an integer")}
    for name, (types, check, rule) in rules.items():
        value = _typed(body, name, types, check, rule)
        if value is not None:
            out[name] = value
    for name in ("frequency_penalty", "presence_penalty"):
        if _typed(body, name, (int, float), rule="a number"):
            raise BadRequest(f"'{name}' is not supported by llmpack serve; use repeat_penalty")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise BadRequest("logprobs are not supported by llmpack serve")
    return out


def max_tokens(body: dict) -> int | None:
    a = _typed(body, "max_tokens", int, lambda v: v >= 1, "an integer >= 1")
    b = _typed(body, "max_completion_tokens", int, lambda v: v >= 1, "an integer >= 1")
    return a if a is not None else b


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop):
        return stop
    raise BadRequest("'stop' must be a string or a list of at most 16 strings")


def _common(body: dict) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if _typed(body, "n", int, rule="an integer") not in (None, 1):
        raise BadRequest("'n' must be 1: llmpack serve writes one choice per request")
    _typed(body, "stream", bool, rule="true or false")
    _typed(body, "stream_options", dict, rule="an object")
    _typed(body, "model", str, rule="a string")
    return {"max_tokens": max_tokens(body), "sampling": sampling(body), "stop": stop_strings(body)}


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")


def chat_job(body: dict) -> Job:
    common = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        clean.append({"role": m["role"], "content": _content(m, i)})
    return Job(messages=clean, **common)


def completion_job(body: dict) -> Job:
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return Job(prompt=list(prompt), **common)
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string, a list of token ids, or a list of one of them")
    if _typed(body, "echo", bool, rule="true or false") or body.get("suffix"):
        raise BadRequest("'echo' and 'suffix' are not supported by llmpack serve")
    return Job(prompt=prompt, **common)


# -- responses -----------------------------------------------------------------------------------
class Reply:
    """Response bodies of one request: chat (object "chat.completion") or text completion."""

    def __init__(self, model_name: str, chat: bool):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model_name

    def _envelope(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, chunk: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            delta = ({"role": "assistant", "content": ""} if first else
                     {"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def usage(self, prompt: tuple[int, int, int], completion_tokens: int) -> dict:
        """prompt: (tokens of the prompt that ran, of which re-used from the KV cache: OpenAI's
        cached_tokens, oldest messages dropped to fit the context). A chat reply reports the last as
        "dropped_messages" (an llmpack field; the prompt was the leading system message, if any,
        and the messages after the dropped ones)."""
        usage = {"prompt_tokens": prompt[0], "completion_tokens": completion_tokens,
                 "total_tokens": prompt[0] + completion_tokens, "prompt_tokens_details": {"cached_tokens": prompt[1]}}
        if self.chat:
            usage["dropped_messages"] = prompt[2]
        return usage

    def full(self, text: str, finish: str, prompt: tuple[int, int, int], completion_tokens: int) -> dict:
        return {**self._envelope(False), "choices": [self._choice(text, finish, False)],
                "usage": self.usage(prompt, completion_tokens)}

    def chunk(self, text: str | None = None, finish: str | None = None, first: bool = False) -> dict:
        return {**self._envelope(True), "choices": [self._choice(text, finish, True, first)]}

    def usage_chunk(self, prompt: tuple[int, int, int], completion_tokens: int) -> dict:
        return {**self._envelope(True), "choices": [], "usage": self.usage(prompt, completion_tokens)}


def error_body(message: str, status: int) -> dict:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "server_unavailable"}
    codes = {401: "invalid_api_key", 413: "context_length_exceeded", 503: "unavailable"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"),
                      "param": None, "code": codes.get(status)}}
