"""The sandbox a chat template renders in (qwen2np/chat/template.py renders with it).

transformers' sandbox (jinja2's `ImmutableSandboxedEnvironment` with its globals and `tojson` filter),
and qwen2np's bounds on one rendering: a `RenderingBudget` of time and characters, set for the rendering in
progress by `bounded_rendering` and checked by every step of the template (each loop iteration, output, call,
attribute or item lookup, operator and filter), before the operations that multiply sizes.

>>> compile_template("{{ 'x' | center(5) }}").render()     # outside a rendering: no budget, no bound
'  x  '
"""

import contextlib
import contextvars
import functools
import json
import re
import string
import time
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatTemplateError


class RenderingBudget:
    """The bounds of one rendering: a deadline and a number of characters (see `render`)."""

    def __init__(self, timeout, max_chars):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.max_chars = max_chars
        self.produced = 0
        self.steps = 0

    def tick(self):
        self.steps += 1
        if self.steps & 63 == 0 and time.monotonic() > self.deadline:  # the clock is read every 64 steps
            raise ChatTemplateError(f"chat template still rendering after {self.timeout:g} s (render_timeout): "
                                    f"does it loop without end?")

    def check_size(self, n, what):
        if n > self.max_chars:
            raise ChatTemplateError(f"chat template: {what} would hold {n:,} characters or items, over the "
                                    f"limit of {self.max_chars:,} (render_max_chars)")

    def check_value(self, value, what="a value"):
        if isinstance(value, (str, list, tuple, dict)):
            self.check_size(len(value), what)
        elif isinstance(value, int) and value.bit_length() > 4 * self.max_chars:
            self.check_size(value.bit_length() // 4, f"{what} (a number, in hexadecimal digits)")
        return value

    def produce(self, n):
        self.produced += n
        if self.produced > self.max_chars:
            raise ChatTemplateError(f"chat template produced more than {self.max_chars:,} characters "
                                    f"(render_max_chars), counting text built in {{% set %}} blocks and macros")


# The bounds of the rendering in progress in this thread (None outside `render`), and whether a template
# is being compiled in it
_BUDGET = contextvars.ContextVar("qwen2np_chat_template_budget", default=None)
_COMPILING = contextvars.ContextVar("qwen2np_chat_template_compiling", default=False)


@contextlib.contextmanager
def bounded_rendering(timeout, max_chars):
    """The rendering inside this block runs within `timeout` seconds and `max_chars` characters; yields
    its RenderingBudget (to check the size of the result)."""
    budget = RenderingBudget(timeout, max_chars)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with every step of the template checking the budget of the rendering."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    # subtle: jinja2's sandbox answers an unsafe attribute (`''.__class__`) with an Undefined that prints
    # as "" and only raises when used further; transformers keeps that. qwen2np refuses at once, so an
    # escape attempt is reported instead of silently rendering. Legitimate templates render the same.
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe.")

    def call_binop(self, context, operator, left, right):
        budget = _BUDGET.get()
        if budget is None:
            return super().call_binop(context, operator, left, right)
        budget.tick()
        _check_binop(budget, operator, left, right)
        return budget.check_value(super().call_binop(context, operator, left, right), f"the result of {operator!r}")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja2's signature)
        budget = _BUDGET.get()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.tick()
        args = _check_call(budget, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return budget.check_value(result, f"the result of {getattr(__obj, '__name__', 'a call')}()")

    def getattr(self, obj, attribute):
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
        return super().getitem(obj, argument)


def _check_binop(budget, operator, left, right):
    """Refuse, before it runs, an operation whose result would pass the size bound."""
    sized = (str, list, tuple)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(n, int):
                budget.check_size(len(seq) * max(n, 0), "the result of '*'")
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        budget.check_size(len(left) + len(right), "the result of '+'")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        budget.check_size(right * left.bit_length() // 4, "the result of '**' (a number, in hexadecimal digits)")
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(budget, left, right)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(budget, fmt, args):
    """`fmt % args`: a field width or precision (or a `*` one taken from args) past the size bound."""
    star = False
    for m in _PERCENT_SPEC.finditer(fmt):
        for group in m.groups():
            if group == "*":
                star = True
            elif group:
                budget.check_size(int(group) if len(group) < 20 else 10 ** 20, "a '%' format field")
    if star:
        for a in args if isinstance(args, tuple) else (args,):
            if isinstance(a, int):
                budget.check_size(abs(a), "a '%' format field")


def _check_str_format(budget, fmt, args, kwargs):
    """`fmt.format(...)`: a width or precision in a format spec past the size bound."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # format() itself will report the malformed string
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:  # a nested width, taken from the arguments
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, int):
                    budget.check_size(abs(a), "a format() field")
        for digits in re.findall(r"\d+", spec):
            budget.check_size(int(digits) if len(digits) < 20 else 10 ** 20, "a format() field")


def _check_call(budget, function, args, kwargs):
    """Refuse, before it runs, a call of a str method that would pass the size bound; returns the args
    (an iterable given to join is read once, here, and passed on as a list)."""
    wrapped = getattr(function, "__wrapped__", function)  # the sandbox wraps str.format
    owner = getattr(wrapped, "__self__", None)
    if not isinstance(owner, str):
        return args
    name = getattr(wrapped, "__name__", "")
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        budget.check_size(args[0], f"the result of {name}()")
    elif name == "expandtabs":
        size = (args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8))
        if isinstance(size, int):
            budget.check_size(len(owner) + owner.count("\t") * max(size, 0), "the result of expandtabs()")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = owner.count(args[0]) if args[0] else len(owner) + 1
        budget.check_size(len(owner) + count * max(len(args[1]) - len(args[0]), 0), "the result of replace()")
    elif name == "join" and args:
        items = list(args[0])
        budget.check_size(len(items), "the list given to join()")
        budget.check_size(sum(len(x) for x in items if isinstance(x, str)) + len(owner) * len(items),
                          "the result of join()")
        return (items,) + tuple(args[1:])
    elif name in ("format", "format_map"):
        _check_str_format(budget, owner, args, kwargs)
    return args


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text in some templates): rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """A `namespace()` that refuses underscore-prefixed attributes (transformers' TemplateNamespace)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        budget = _BUDGET.get()
        if budget is not None:  # `{% set ns.text = ns.text ~ ns.text %}` in a loop doubles without end
            budget.tick()
            budget.check_value(value, f"namespace attribute {name!r}")
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")


class _TemplateDict:
    """`dict(...)` in templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: jinja's own tojson escapes HTML characters (<, >, &, ') and would change prompts
    budget = _BUDGET.get()
    if budget is not None and indent is not None:  # the indent is repeated on every line
        width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        budget.check_size(width * 1000, "the indent of tojson, times 1000 lines,")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


# -- the budget inside the template: loops, output, filters ----------------------------------------------
# subtle: both filters below take the context (pass_context) only so that jinja2 never folds them into
# constants at compile time: they must run at every rendering, under that rendering's budget.


@jinja2.pass_context
def _counted_loop(context, iterable):
    """Wraps the iterable of every `{% for %}`: each iteration checks the deadline."""
    budget = _BUDGET.get()
    if budget is None:
        return iterable
    return _ticking(budget, iterable)


def _ticking(budget, iterable):
    for item in iterable:
        budget.tick()
        yield item


@jinja2.pass_context
def _counted_output(context, value):
    """Wraps every piece of output (`{{ x }}` and literal text): counts its characters. `str(value)` is
    what jinja2 writes for it (no autoescape, no finalize)."""
    text = str(value)
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()
        budget.produce(len(text))
    return text


_LOOP_FILTER, _OUTPUT_FILTER = "qwen2np_counted_loop", "qwen2np_counted_output"


def _count_steps(ast):
    """Rewrite the template's syntax tree so that every loop iterates through `_counted_loop` and every
    output goes through `_counted_output`."""
    for loop in ast.find_all(jinja2.nodes.For):
        loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
    for output in ast.find_all(jinja2.nodes.Output):
        output.nodes = [
            jinja2.nodes.Filter(jinja2.nodes.Const(child.data, lineno=child.lineno)
                                if isinstance(child, jinja2.nodes.TemplateData) else child,
                                _OUTPUT_FILTER, [], [], None, None, lineno=child.lineno)
            for child in output.nodes
        ]
    return ast


def _bounded_filter(name, function):
    """A jinja2 filter that checks the deadline, refuses arguments that would pass the size bound, and
    checks the size of its result."""
    arg_offset = 1 if hasattr(function, "jinja_pass_arg") else 0  # the context/environment comes first

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        budget = _BUDGET.get()
        if budget is None:
            if _COMPILING.get():  # subtle: jinja2 folds a filter of constants at compile time, unbounded:
                raise jinja2.nodes.Impossible()  # this makes it run when rendering, under the budget
            return function(*args, **kwargs)
        budget.tick()
        args = _check_filter(budget, name, list(args), arg_offset, kwargs)
        return budget.check_value(function(*args, **kwargs), f"the result of the {name} filter")

    return bounded


def _check_filter(budget, name, args, at, kwargs):
    def arg(i, key, default):
        return args[at + i] if len(args) > at + i else kwargs.get(key, default)

    value = args[at] if len(args) > at else None
    if name == "center":
        width = arg(1, "width", 80)
        if isinstance(width, int):
            budget.check_size(width, "the result of the center filter")
    elif name == "indent":
        width = arg(1, "width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        lines = str(value).count("\n") + 1
        budget.check_size(len(str(value)) + lines * max(width, 0), "the result of the indent filter")
    elif name == "wordwrap":
        width, wrap = arg(1, "width", 79), arg(3, "wrapstring", None)
        if isinstance(width, int) and isinstance(wrap, str):
            budget.check_size(len(str(value)) * (1 + len(wrap) // max(width, 1)), "the result of the wordwrap filter")
    elif name == "format" and isinstance(value, str):
        _check_percent_format(budget, value, tuple(args[at + 1:]) or tuple(kwargs.values()))
    elif name == "replace" and isinstance(value, str):
        old, new = arg(1, "old", None), arg(2, "new", None)
        if isinstance(old, str) and isinstance(new, str):
            count = value.count(old) if old else len(value) + 1
            budget.check_size(len(value) + count * max(len(new) - len(old), 0), "the result of the replace filter")
    elif name in ("join", "sum") and value is not None and not isinstance(value, (str, jinja2.Undefined)):
        items = list(value)
        budget.check_size(len(items), f"the list given to the {name} filter")
        sizes = [len(x) for x in items if isinstance(x, (str, list, tuple))]
        if name == "join":
            budget.check_size(sum(sizes) + len(str(arg(1, "d", ""))) * len(items), "the result of the join filter")
        elif sizes:  # sum of lists: quadratic in time as Python does it
            budget.check_size(sum(sizes) * len(sizes), "the work of the sum filter adding lists")
        args[at] = items
    return args


@lru_cache(maxsize=32)
def compile_template(template):
    """The compiled template (cached, as transformers caches it), with the budget checks woven in."""
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters[_LOOP_FILTER] = _counted_loop
    env.filters[_OUTPUT_FILTER] = _counted_output
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    token = _COMPILING.set(True)
    try:
        return env.from_string(_count_steps(env.parse(template)))
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e
    except RecursionError as e:
        raise ChatTemplateError("chat template nested too deeply to compile") from e
    finally:
        _COMPILING.reset(token)
