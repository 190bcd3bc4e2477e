"""Renders a model's own Jinja chat template in a sandbox (templates come from the file: data, not code)."""
from __future__ import annotations

import json
from datetime import datetime

from llmpack.formats.errors import LlmpackError


class TemplateError(LlmpackError):
    pass


def _raise(message):
    raise TemplateError(f"chat template refused the conversation: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers renders tojson without HTML escaping; templates depend on that.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = None


def render(template: str, messages: list[dict], special: dict, add_generation_prompt: bool = True,
           **extra) -> str:
    global _ENV
    import jinja2

    if _ENV is None:
        _ENV = _environment()
    try:
        tpl = _ENV.from_string(template)
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                          **{k: v for k, v in special.items()}, **extra)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed to render: {e}")


FALLBACK = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
