"""Chat templates: turn a conversation (a list of {"role", "content"} messages) into the model's prompt.

A chat template is a Jinja2 program shipped with the tokenizer. It is rendered exactly as transformers
5.24 renders it (`utils/chat_template_utils.py`): in a sandbox (`ImmutableSandboxedEnvironment` with
`trim_blocks`, `lstrip_blocks` and loop controls), with transformers' `tojson` filter (no HTML
escaping, non-ASCII kept), the globals `raise_exception`, `strftime_now`, `dict` and a `namespace` that
refuses underscore names, and a context of `messages`, `tools`, `documents`, `add_generation_prompt`
plus the tokenizer's special tokens (`eos_token`, `pad_token`, ...) and any extra keyword.

>>> from types import SimpleNamespace
>>> tok = SimpleNamespace(special_tokens_map={"eos_token": "<|im_end|>"}, chat_template=(
...     "{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}{{ eos_token }}\\n{% endfor %}"
...     "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"))
>>> apply_chat_template(tok, [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
'<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'

A template is untrusted code: it cannot reach Python internals.

>>> tok.chat_template = "{{ ''.__class__.__mro__ }}"
>>> apply_chat_template(tok, [{"role": "user", "content": "Hi"}], tokenize=False)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
qwen2np.errors.ChatTemplateError: chat template blocked by the sandbox: access to attribute '__class__' of ...
"""

import contextvars
import dataclasses
import functools
import inspect
import json
import re
import string
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

import numpy as np

from .errors import ChatTemplateError
from .tool_schema import get_json_schema

# Names a message's reasoning is passed under; the first is the one chat templates read (transformers 5.x)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

# The default bounds of one rendering (apply_chat_template's render_timeout and render_max_chars): a real
# chat template renders a conversation in milliseconds, into at most a few hundred thousand characters
RENDER_TIMEOUT_S = 5.0
RENDER_MAX_CHARS = 10_000_000
# The longest template compiled: compiling is not under the render bound, and takes about 2 s per 100,000
# characters of tags here; real chat templates are a few thousand characters (Qwen2.5's with tools: 2,500)
MAX_TEMPLATE_CHARS = 200_000


def apply_chat_template(
    tokenizer,
    conversation,
    tools=None,
    documents=None,
    chat_template=None,
    add_generation_prompt=False,
    continue_final_message=False,
    tokenize=True,
    padding=False,
    truncation=False,
    max_length=None,
    return_tensors=None,
    return_dict=True,
    return_assistant_tokens_mask=False,
    tokenizer_kwargs=None,
    sanitize_control_tokens=False,
    render_timeout=RENDER_TIMEOUT_S,
    render_max_chars=RENDER_MAX_CHARS,
    **kwargs,
):
    """Render `conversation` (one list of messages, or a list of them) with the tokenizer's template.

    As in transformers 5.24: `tokenize=False` returns the text (a list of texts for a batch); otherwise
    the text is encoded without added special tokens and a BatchEncoding is returned (`return_dict=True`,
    the default) or just its `input_ids`. `continue_final_message` leaves the last message open so the
    model continues it. `tools` are JSON schemas or Python functions (converted with `get_json_schema`).

    Each message must be a dict (or a dataclass, or a pydantic model) with a string "role" and a
    "content" that is a string, None (dropped, as transformers drops None values) or a list of parts
    like {"type": "text", "text": "..."}; anything else (bytes, a number, no role) is refused with the
    message's index. Other keys (tool_calls, name, ...) are passed on as they are.

    qwen2np's own: the rendering of each conversation is bounded, `render_timeout` seconds and
    `render_max_chars` characters produced (see `render`); past either, a ChatTemplateError.
    """
    if return_assistant_tokens_mask:
        raise ChatTemplateError("return_assistant_tokens_mask is not supported by qwen2np's apply_chat_template")
    if sanitize_control_tokens:
        raise ChatTemplateError("sanitize_control_tokens is not supported by qwen2np's apply_chat_template")
    template = get_chat_template(tokenizer, chat_template, tools)
    if not isinstance(template, str):
        raise ChatTemplateError(f"a chat template must be a string (Jinja2 source), found {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"the chat template is {len(template):,} characters long; qwen2np compiles "
                                f"templates of at most {MAX_TEMPLATE_CHARS:,} (MAX_TEMPLATE_CHARS)")
    if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation: give at least one message")
    is_batched = isinstance(conversation, (list, tuple)) and (
        isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    )
    conversations = list(conversation) if is_batched else [conversation]
    try:
        conversations = [_normalize_messages(c, f"conversation {i}, " if is_batched else "")
                         for i, c in enumerate(conversations)]
    except RecursionError:
        raise ChatTemplateError("the conversation is nested too deeply (or contains itself)") from None
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError(
            "continue_final_message and add_generation_prompt are not compatible: continue_final_message "
            "lets the model continue the last message, add_generation_prompt starts a new assistant message"
        )
    context = {**dict(getattr(tokenizer, "special_tokens_map", {}) or {}), **kwargs}
    rendered = [
        render(template, chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
               continue_final_message=continue_final_message, render_timeout=render_timeout,
               render_max_chars=render_max_chars, **context)
        for chat in conversations
    ]
    text = rendered if is_batched else rendered[0]
    if not tokenize:
        return text
    out = tokenizer(text, padding=padding, truncation=truncation, max_length=max_length,
                    add_special_tokens=False, return_tensors=return_tensors, **(tokenizer_kwargs or {}))
    return out if return_dict else out["input_ids"]


def get_chat_template(tokenizer, chat_template=None, tools=None):
    """The template text: `chat_template` (a template, or the name of one of the tokenizer's), else the
    tokenizer's own ("tool_use" when tools are given and it has one, else "default")."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        if chat_template is not None and chat_template in own:
            return own[chat_template]
        if chat_template is None:
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ChatTemplateError(
                f"this tokenizer has several chat templates and none is named 'default': pass "
                f"chat_template= one of {sorted(own)}"
            )
    if chat_template is not None:
        return chat_template
    if own is None:
        raise ChatTemplateError(
            "this tokenizer has no chat template (tokenizer.chat_template is not set) and no chat_template= "
            "was given; set one, or pass the prompt as plain text"
        )
    return own


def render(template, messages, tools=None, documents=None, add_generation_prompt=False,
           continue_final_message=False, render_timeout=RENDER_TIMEOUT_S, render_max_chars=RENDER_MAX_CHARS,
           **context):
    """Render one conversation; the core of transformers' `render_jinja_template`.

    A template is untrusted code, and the sandbox keeps it away from Python internals but not from
    spending time or memory. So the rendering is bounded (qwen2np's own; transformers has no bound):

    * time: every loop iteration, call, attribute or item lookup and operator checks a deadline
      `render_timeout` seconds away (a thread cannot interrupt Python code, so the template's own
      steps do the checking);
    * size: the characters produced, counted at every `{{ ... }}` and every piece of literal text,
      including what `{% set %}` blocks and macros build and then discard, may not exceed
      `render_max_chars`; neither may any one string, list or number built by an operator (`*`, `+`,
      `%`, `**`), a call or a filter, checked *before* the operations that multiply sizes (`'x' * n`,
      `'%999999d'`, `center`, `indent`, `join`, `replace`, `format`, `tojson(indent=)`, `sum`).

    Past either bound, or on a recursion too deep for Python, a ChatTemplateError. The bounds cover the
    ways known to grow text or time from a short template; they are a defence, not a proof.
    """
    if not (isinstance(render_timeout, (int, float)) and not isinstance(render_timeout, bool) and render_timeout > 0):
        raise ChatTemplateError(f"render_timeout must be a number of seconds > 0, found {render_timeout!r}")
    if not (isinstance(render_max_chars, int) and not isinstance(render_max_chars, bool) and render_max_chars > 0):
        raise ChatTemplateError(f"render_max_chars must be an integer > 0, found {render_max_chars!r}")
    compiled = compile_template(template)
    tool_schemas = None
    if tools is not None:
        tool_schemas = []
        for tool in tools:
            if isinstance(tool, dict):
                tool_schemas.append(tool)
            elif inspect.isfunction(tool) or inspect.ismethod(tool):
                tool_schemas.append(get_json_schema(tool))
            else:
                raise ChatTemplateError(
                    f"tools: expected JSON schemas (dicts) or Python functions with type hints and a "
                    f"docstring, found {type(tool).__name__}"
                )
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise ChatTemplateError("documents: expected a list of dicts with 'title' and 'text' keys")
    # Everything the template sees is rebuilt from plain JSON types (as transformers does): rich objects
    # have methods the sandbox does not know are dangerous.
    tool_schemas, documents, context = map(_plain_template_data, (tool_schemas, documents, context))
    chat = _alias_reasoning_fields(_plain_template_data(messages))

    final_message = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = chat[-1].get(field)
        if final_message is None:
            raise ChatTemplateError(f'continue_final_message: the final message has no "{field}" to continue')
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
        if not any(f in template for f in fields):
            raise ChatTemplateError(f'continue_final_message: the chat template never reads the field "{field}"')
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError("continue_final_message: no text to continue in the final message")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    budget = _Budget(render_timeout, render_max_chars)
    token = _BUDGET.set(budget)
    try:
        text = compiled.render(messages=chat, tools=tool_schemas, documents=documents,
                               add_generation_prompt=add_generation_prompt, **context)
        budget.check_size(len(text), "the rendered text")
    except ChatTemplateError:  # a bound was passed
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from e
    except TemplateError as e:  # raise_exception(...) in the template, or an undefined value misused
        raise ChatTemplateError(f"chat template raised an error: {e}") from e
    except RecursionError as e:
        raise ChatTemplateError("chat template recursed too deeply (a macro or a recursive loop without end?)") from e
    except MemoryError as e:
        raise ChatTemplateError("chat template ran out of memory while rendering") from e
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise ChatTemplateError(
            f"chat template failed on this conversation ({type(e).__name__}: {e}); message contents must "
            f"be strings for templates that concatenate them"[:2000]
        ) from e
    except Exception as e:  # ZeroDivisionError, OverflowError, ...: still the template's failure
        raise ChatTemplateError(f"chat template failed on this conversation ({type(e).__name__}: {e})"[:2000]) from e
    finally:
        _BUDGET.reset(token)
    if continue_final_message:
        if final_message.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ChatTemplateError(
                "continue_final_message: the final message does not appear in the rendered chat (the "
                "template deletes parts of it)"
            )
        at = text.rindex(_CONTINUE_TAG.strip())
        if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            text = text[:at]
        else:  # the template trimmed trailing spacing of the message
            text = text[:at].rstrip()
    return text


# -- the sandbox ----------------------------------------------------------------------------------------


class _Budget:
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


# -- the data the template sees -------------------------------------------------------------------------


def _normalize_messages(conversation, where=""):
    """Messages as dicts without None values (OpenAI-style `content=None` breaks templates), after checking
    that each is a message: a mapping with a string role and a string, None or list-of-parts content."""
    messages = getattr(conversation, "messages", conversation)
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"{where}expected a list of messages (dicts with 'role' and 'content'), "
                                f"found {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        message = _as_dicts(message)
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"{where}message {i}: expected a dict with 'role' and 'content', found {type(message).__name__}"
            )
        _check_message(message, f"{where}message {i}")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _as_dicts(value):
    """Dataclasses and pydantic models (an OpenAI SDK message, its tool calls) as dicts, at any depth."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _as_dicts(value.model_dump())
    if isinstance(value, Mapping):
        return {k: _as_dicts(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_dicts(v) for v in value) if type(value) in (list, tuple) else [_as_dicts(v) for v in value]
    return value


def _check_message(message, where):
    """Refuse what a template would silently misrender: no role, bytes or numbers as text."""
    if "role" not in message:
        raise ChatTemplateError(f"{where}: no 'role' (expected a string such as 'user', 'assistant', 'system' "
                                f"or 'tool')")
    if not isinstance(message["role"], str):
        raise ChatTemplateError(f"{where}: 'role' must be a string, found {type(message['role']).__name__}")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, (list, tuple)):
        raise ChatTemplateError(
            f"{where}: 'content' must be a string, None or a list of parts like {{'type': 'text', 'text': "
            f"'...'}}, found {type(content).__name__}"
            + (" (decode bytes to str first)" if isinstance(content, (bytes, bytearray)) else ""))
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise ChatTemplateError(f"{where}: content part {j}: expected a dict with a string 'type' (like "
                                    f"{{'type': 'text', 'text': '...'}}), found {str(part)[:80]!r}")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"{where}: content part {j}: a text part needs a string 'text', found "
                                    f"{type(part.get('text')).__name__}")


def _alias_reasoning_fields(chat):
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain_template_data(value):
    """`value` rebuilt from JSON types; anything else becomes a placeholder like "<ndarray>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


__all__ = ["apply_chat_template", "compile_template", "get_chat_template", "get_json_schema", "render"]
