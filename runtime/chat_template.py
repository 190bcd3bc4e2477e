"""Renders a model's own Jinja chat template in a sandbox (templates come from the file: data, not code).

Same environment as transformers' `apply_chat_template`: jinja2's ImmutableSandboxedEnvironment
with trim_blocks/lstrip_blocks, the loopcontrols extension, a no-op `{% generation %}` tag, the
`tojson` filter without HTML escaping, `raise_exception`, `strftime_now`, a restricted `dict` and a
`namespace` that refuses underscore names; variables: messages, tools, documents,
add_generation_prompt and the named special tokens (bos_token, eos_token, ...).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from llmpack.formats.errors import LlmpackError


class TemplateError(LlmpackError):
    pass


def _raise(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers renders tojson without HTML escaping; templates depend on that.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks: render the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # Namespaces reject underscore attributes, so templates cannot reach CPython internals through them.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    class Sandbox(ImmutableSandboxedEnvironment):
        # jinja2 turns an unsafe attribute into an Undefined that fails only when used further;
        # printing it yields "". Refuse at once, so an escape attempt is always a clear error.
        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = Namespace
    return env


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the model's chat template does not parse (line {e.lineno}: {e.message})")


def render(template: str, messages: list[dict], special: dict, add_generation_prompt: bool = True,
           **extra) -> str:
    """The conversation as the prompt text the model was trained on (like transformers'
    `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`)."""
    import jinja2

    # As transformers: keys whose value is None are dropped (templates test for a missing key).
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {"tools": None, "documents": None, **{k: v for k, v in special.items() if v is not None}, **extra}
    tpl = _compile(template)
    try:
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template tried something the sandbox forbids and was stopped: {e}")
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed to render: {e}")


FALLBACK = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
