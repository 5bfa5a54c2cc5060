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

import dataclasses
import inspect
import json
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
    **kwargs,
):
    """Render `conversation` (one list of messages, or a list of them) with the tokenizer's template.

    As in transformers 5.24: `tokenize=False` returns the text (a list of texts for a batch); otherwise
    the text is encoded without added special tokens and a BatchEncoding is returned (`return_dict=True`,
    the default) or just its `input_ids`. `continue_final_message` leaves the last message open so the
    model continues it. `tools` are JSON schemas or Python functions (converted with `get_json_schema`).
    """
    if return_assistant_tokens_mask:
        raise ChatTemplateError("return_assistant_tokens_mask is not supported by qwen2np's apply_chat_template")
    if sanitize_control_tokens:
        raise ChatTemplateError("sanitize_control_tokens is not supported by qwen2np's apply_chat_template")
    template = get_chat_template(tokenizer, chat_template, tools)
    if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation: give at least one message")
    is_batched = isinstance(conversation, (list, tuple)) and (
        isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    )
    conversations = list(conversation) if is_batched else [conversation]
    conversations = [_normalize_messages(c) for c in conversations]
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError(
            "continue_final_message and add_generation_prompt are not compatible: continue_final_message "
            "lets the model continue the last message, add_generation_prompt starts a new assistant message"
        )
    context = {**dict(getattr(tokenizer, "special_tokens_map", {}) or {}), **kwargs}
    rendered = [
        render(template, chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
               continue_final_message=continue_final_message, **context)
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
           continue_final_message=False, **context):
    """Render one conversation; the core of transformers' `render_jinja_template`."""
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
    try:
        text = compiled.render(messages=chat, tools=tool_schemas, documents=documents,
                               add_generation_prompt=add_generation_prompt, **context)
    except SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from e
    except TemplateError as e:  # raise_exception(...) in the template, or an undefined value misused
        raise ChatTemplateError(f"chat template raised an error: {e}") from e
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise ChatTemplateError(
            f"chat template failed on this conversation ({type(e).__name__}: {e}); message contents must "
            f"be strings for templates that concatenate them"
        ) from e
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


class _StrictSandbox(ImmutableSandboxedEnvironment):
    # subtle: jinja2's sandbox answers an unsafe attribute (`''.__class__`) with an Undefined that prints
    # as "" and only raises when used further; transformers keeps that. qwen2np refuses at once, so an
    # escape attempt is reported instead of silently rendering. Legitimate templates render the same.
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe.")


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
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(template):
    """The compiled template (cached, as transformers caches it)."""
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e


# -- the data the template sees -------------------------------------------------------------------------


def _normalize_messages(conversation):
    """Messages as dicts without None values (OpenAI-style `content=None` breaks templates)."""
    messages = getattr(conversation, "messages", conversation)
    out = []
    for i, message in enumerate(messages):
        if dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = dataclasses.asdict(message)
        elif callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"message {i}: expected a dict with 'role' and 'content', found {type(message).__name__}"
            )
        out.append({k: v for k, v in message.items() if v is not None})
    return out


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
