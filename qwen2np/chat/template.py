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

A template is untrusted code: it cannot reach Python internals, and its rendering is bounded in time and
size (the sandbox and its bounds: qwen2np/chat/sandbox.py).

>>> tok.chat_template = "{{ ''.__class__.__mro__ }}"
>>> apply_chat_template(tok, [{"role": "user", "content": "Hi"}], tokenize=False)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
qwen2np.errors.ChatTemplateError: chat template blocked by the sandbox: access to attribute '__class__' of ...
"""

import dataclasses
import inspect
from collections.abc import Mapping

from jinja2.exceptions import SecurityError, TemplateError

import numpy as np

from ..errors import ChatTemplateError
from .sandbox import bounded_rendering, compile_template
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
    with bounded_rendering(render_timeout, render_max_chars) as budget:
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
