"""Renders a model's own Jinja chat template in a sandbox (templates come from the file: data, not code).

Same environment as transformers' `apply_chat_template`: jinja2's ImmutableSandboxedEnvironment
with trim_blocks/lstrip_blocks, the loopcontrols extension, a no-op `{% generation %}` tag, the
`tojson` filter without HTML escaping, `raise_exception`, `strftime_now`, a restricted `dict` and a
`namespace` that refuses underscore names; variables: messages, tools, documents,
add_generation_prompt and the named special tokens (bos_token, eos_token, ...).

A template is data from the file, so rendering is bounded (see `Budget`): every loop iteration is
counted (MAX_LOOP_ITERATIONS for the whole render) and checks a wall-clock deadline
(RENDER_SECONDS); `range` is capped at MAX_RANGE items; `*`, `+`, `%`, `~`, `**`, string methods
and filters refuse results larger than MAX_CHARS characters (or integers beyond MAX_INT_BITS)
before they are built, and the characters a render produces (printed or captured) are capped at
PRODUCED_CHARS. Exceeding any bound is one TemplateError (an LlmpackError): the chat session
goes on. Templates longer than MAX_TEMPLATE_CHARS are refused before parsing: parsing costs about
6 s per MB (measured: 256 KB of repeated Qwen template 1.6 s, 2 MB 13.5 s, on 2 busy cores).
Rendering a real template is far inside every bound: Qwen2.5's, 500 turns: 0.02 s, 135 k chars.
"""
from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime
from functools import lru_cache

from llmpack.formats.errors import LlmpackError

MAX_TEMPLATE_CHARS = 128 * 1024  # real templates: 1-20 KB; parsing 128 KB takes ~0.8 s
MAX_CHARS = 4 * 1024 * 1024  # one string / list / the rendered prompt (a prompt beyond any context)
PRODUCED_CHARS = 4 * MAX_CHARS  # everything printed or captured in {% set %} blocks, in one render
MAX_LOOP_ITERATIONS = 1_000_000  # a 500-turn conversation with tools takes a few thousand
MAX_RANGE = 100_000  # as jinja2's sandbox
MAX_INT_BITS = 4096
RENDER_SECONDS = 10.0
_BIG_WIDTH = re.compile(r"\d{7,}")  # a format width/precision of a million or more


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


class Budget:
    """The bounds of one render (thread-local: a server renders in several threads)."""

    _local = threading.local()

    def __init__(self):
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.iterations = 0
        self.produced = 0

    @classmethod
    def current(cls) -> "Budget":
        budget = getattr(cls._local, "budget", None)
        if budget is None:  # a template rendered outside render() (e.g. at compile time): fresh bounds
            budget = cls._local.budget = Budget()
        return budget

    @classmethod
    def start(cls) -> "Budget":
        cls._local.budget = Budget()
        return cls._local.budget

    def tick(self, n: int = 1):
        self.iterations += n
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise TemplateError(f"the chat template runs more than {MAX_LOOP_ITERATIONS:,} loop iterations; "
                                f"it was stopped (the template is broken or hostile)")
        if self.iterations % 256 == 0:
            self.check_time()

    def check_time(self):
        if time.monotonic() > self.deadline:
            raise TemplateError(f"the chat template took more than {RENDER_SECONDS:g} s to render; it was stopped "
                                f"(the template is broken or hostile)")

    def produce(self, value):
        self.produced += _size(value)
        if self.produced > PRODUCED_CHARS:
            raise TemplateError(f"the chat template produced more than {PRODUCED_CHARS:,} characters; "
                                f"it was stopped (the template is broken or hostile)")


def _size(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _too_big(what: str, n: int):
    raise TemplateError(f"the chat template builds {what} of {n:,} items (limit {MAX_CHARS:,}); it was stopped "
                        f"(the template is broken or hostile)")


def _check_size(n: int, what: str = "a string or list"):
    if n > MAX_CHARS:
        _too_big(what, n)


def _check_args(args, kwargs):
    """Integer arguments (widths, counts) beyond MAX_CHARS build outputs at least that large."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
            raise TemplateError(f"the chat template passes the number {a} to a function or filter "
                                f"(limit {MAX_CHARS:,}); it was stopped (the template is broken or hostile)")


def _check_format_string(fmt):
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise TemplateError("the chat template formats with a width of a million or more; it was stopped "
                            "(the template is broken or hostile)")


def _estimate_join(sep, items) -> list:
    items = list(items)
    Budget.current().tick(len(items))
    _check_size(len(items) * len(str(sep)) + sum(_size(x) if isinstance(x, str) else 0 for x in items))
    return items


def _estimate_replace(s, old, new, count=-1):
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        n = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _check_size(len(s) + n * (len(new) - len(old)))


def _guard_call(obj, args, kwargs):
    """Pre-checks of a call a template makes (string methods that can build huge strings)."""
    if obj is _range:
        return args  # range() has its own bound and message
    _check_args(args, kwargs)
    bound = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    target = getattr(bound, "__self__", None)
    name = getattr(bound, "__name__", "")
    if isinstance(target, str):
        if name in ("format", "format_map"):
            _check_format_string(target)
        elif name == "join" and args:
            return (_estimate_join(target, args[0]),) + tuple(args[1:])
        elif name == "replace" and len(args) >= 2:
            _estimate_replace(target, *args[:3])
    return args


def _guard_filter(name, func):
    """A jinja filter wrapped with the same checks (its pass_context/... marker kept by wraps)."""
    @functools.wraps(func)
    def guarded(*args, **kwargs):
        budget = Budget.current()
        budget.check_time()
        _check_args(args, kwargs)
        plain = [a for a in args if not _is_jinja_internal(a)]
        if name == "join" and plain:
            value = _estimate_join(kwargs.get("d", plain[1] if len(plain) > 1 else ""), plain[0])
            args = tuple(value if a is plain[0] else a for a in args)
        elif name == "replace" and len(plain) >= 3:
            _estimate_replace(*plain[:4])
        elif name == "format" and plain:
            _check_format_string(plain[0])
        result = func(*args, **kwargs)
        _check_size(_size(result))
        return result
    return guarded


def _is_jinja_internal(a) -> bool:
    import jinja2

    return isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment))


def _binop_guard(op, left, right):
    def seq(x):
        return isinstance(x, (str, list, tuple))

    def num(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if op == "*":
        if seq(left) and num(right):
            _check_size(len(left) * right)
        elif seq(right) and num(left):
            _check_size(len(right) * left)
        elif num(left) and num(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            _too_big("a number with bits", left.bit_length() + right.bit_length())
    elif op == "**" and num(left) and num(right) and abs(left) > 1 and right > 0:
        bits = right * max(1, abs(left).bit_length() - 1)
        if bits > MAX_INT_BITS:
            _too_big("a number with bits", bits)
    elif op == "+" and seq(left) and seq(right):
        _check_size(len(left) + len(right))
    elif op == "%" and isinstance(left, str):
        _check_format_string(left)
        _check_args(right if isinstance(right, tuple) else (right,), {})


def _guarded_code_generator():
    """(code generator class, {filter name: guard}): every `{% for %}` iterates through the loop
    guard and every printed expression and `~` result goes through the output guard, both charged
    to the render's Budget."""
    import jinja2
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator

    @jinja2.pass_context  # context filters are never folded at compile time (no budget there)
    def loop_guard(context, iterable):
        budget = Budget.current()
        for item in iterable:
            budget.tick()
            yield item

    @jinja2.pass_context
    def output_guard(context, value):
        Budget.current().produce(value)
        return value

    class GuardedCodeGenerator(CodeGenerator):
        """Every `{% for %}` iterates through loop_guard; every printed expression and `~` result
        goes through output_guard (the tree is rewritten before any code is generated)."""

        def visit_Template(self, node, frame=None):
            for loop in node.find_all(nodes.For):
                loop.iter = nodes.Filter(loop.iter, "llmpack_loop_guard", [], [], None, None, lineno=loop.lineno)
            for concat in list(node.find_all(nodes.Concat)):
                concat.nodes = [nodes.Filter(n, "llmpack_output_guard", [], [], None, None, lineno=concat.lineno)
                                for n in concat.nodes]
            for out in node.find_all(nodes.Output):
                out.nodes = [n if isinstance(n, nodes.TemplateData) else
                             nodes.Filter(n, "llmpack_output_guard", [], [], None, None, lineno=out.lineno)
                             for n in out.nodes]
            super().visit_Template(node, frame)

    return GuardedCodeGenerator, {"llmpack_loop_guard": loop_guard, "llmpack_output_guard": output_guard}


def _template_extras():
    """({% generation %} extension, underscore-refusing namespace) that chat templates use."""
    import jinja2
    from jinja2.ext import Extension

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

    return GenerationTag, Namespace


@lru_cache(maxsize=1)
def _environment():
    # The jinja2 imports stay in these functions so that loading a model without a template does
    # not pay for them; the guards are closures over the render budget (Budget.current()).
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    generator, guard_filters = _guarded_code_generator()
    GenerationTag, Namespace = _template_extras()

    class Sandbox(ImmutableSandboxedEnvironment):
        code_generator_class = generator
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        # jinja2 turns an unsafe attribute into an Undefined that fails only when used further;
        # printing it yields "". Refuse at once, so an escape attempt is always a clear error.
        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context, operator, left, right):
            _binop_guard(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(*args, **kwargs):  # (self, context, obj, *args): positional-only, as jinja2's own
            self, context, obj, *rest = args
            Budget.current().check_time()
            rest = _guard_call(obj, tuple(rest), kwargs)
            return ImmutableSandboxedEnvironment.call(self, context, obj, *rest, **kwargs)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters.update(guard_filters)
    env.globals["range"] = _range
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = Namespace
    return env


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateError(f"the chat template asks for range({', '.join(map(repr, args))}) of {len(r):,} numbers (the sandbox allows "
                            f"{MAX_RANGE:,}); it was stopped (the template is broken or hostile)")
    return r


def check_template(template: str):
    """Compile `template` (cached) or raise TemplateError: too long, or does not parse."""
    if not isinstance(template, str):
        raise TemplateError(f"the model's chat template is a {type(template).__name__}, not text")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"the model's chat template has {len(template):,} characters (limit "
                            f"{MAX_TEMPLATE_CHARS:,}); it is refused unparsed (broken or hostile)")
    return _compile(template)


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2

    Budget.start()
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the model's chat template does not parse (line {e.lineno}: {e.message})")
    except RecursionError:
        raise TemplateError("the model's chat template is nested too deeply to parse")


def render(template: str, messages: list[dict], special: dict, add_generation_prompt: bool = True,
           **extra) -> str:
    """The conversation as the prompt text the model was trained on (like transformers'
    `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`)."""
    import jinja2

    # As transformers: keys whose value is None are dropped (templates test for a missing key).
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {"tools": None, "documents": None, **{k: v for k, v in special.items() if v is not None}, **extra}
    tpl = check_template(template)
    budget = Budget.start()
    out, size = [], 0
    try:
        for piece in tpl.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            size += len(piece)
            if size > MAX_CHARS:
                raise TemplateError(f"the chat template's output passed {MAX_CHARS:,} characters; it was stopped "
                                    f"(the template is broken or hostile, or the conversation is far too long)")
            budget.check_time()
            out.append(piece)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template tried something the sandbox forbids and was stopped: {_line(e)}")
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed to render: {_line(e)}")
    except RecursionError:
        raise TemplateError("the chat template recursed too deeply; it was stopped (broken or hostile)")
    except MemoryError:
        raise TemplateError("the chat template ran out of memory; it was stopped (broken or hostile)")
    except Exception as e:  # noqa: BLE001 - a template is data: its TypeError/OverflowError/... is one line too
        raise TemplateError(f"the chat template failed to render: {e.__class__.__name__}: {_line(e)}")
    return "".join(out)


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


FALLBACK = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
