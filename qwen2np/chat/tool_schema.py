"""Tools given to a chat template as Python functions: their JSON schema, as transformers' get_json_schema
builds it from the type hints and the Google-style docstring.
"""

import enum
import inspect
import json
import re
import types
import typing

from ..errors import ChatTemplateError

_DESCRIPTION_RE = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_ARGS_RE = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
_ARGS_SPLIT_RE = re.compile(
    r"""
(?:^|\n)  # Match the start of the args block, or a newline
([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*  # Capture the indentation and the argument name, skip a "(type)"
(.*?)\s*  # Capture the argument description, which can span multiple lines, and strip trailing spacing
(?=\n(?!\1[ \t])[ \t]*\w+(?:[ \t]*\([^()\n]*\))?:|\Z)  # Stop at the next "name:" not indented deeper, or the end
""",
    re.DOTALL | re.VERBOSE,
)
_RETURNS_RE = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)
_JSON_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BASIC_TYPES = {**{t: {"type": n} for t, n in _JSON_SCALARS.items()},
                list: {"type": "array"}, tuple: {"type": "array"}, dict: {"type": "object"}, typing.Any: {}}


def get_json_schema(func):
    """The JSON schema of a tool function from its type hints and Google-style docstring, as
    transformers' `get_json_schema` builds it.

    >>> def multiply(x: float, y: float):
    ...     '''
    ...     Multiply two numbers.
    ...
    ...     Args:
    ...         x: The first number
    ...         y: The second number
    ...     '''
    >>> get_json_schema(multiply)["function"]["parameters"]["properties"]["x"]
    {'type': 'number', 'description': 'The first number'}
    """
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise ChatTemplateError(f"tool {name}: a function needs a docstring to be converted to a JSON schema")
    doc = doc.strip()
    m = _DESCRIPTION_RE.search(doc)
    description = m.group(1).strip() if m else None
    m = _ARGS_RE.search(doc)
    arg_docs = {}
    if m:
        block = "\n".join(line for line in m.group(1).split("\n") if line.strip())
        arg_docs = {a[1]: re.sub(r"\s*\n+\s*", " ", a[2].strip()) for a in _ARGS_SPLIT_RE.findall(block)}
    m = _RETURNS_RE.search(doc)
    returns_doc = m.group(1).strip() if m else None

    try:
        hints = typing.get_type_hints(func)
        params = list(inspect.signature(func).parameters.values())
    except Exception as e:  # a forward reference that names nothing, an object that is not a function
        raise ChatTemplateError(f"tool {name}: cannot read its signature and type hints ({type(e).__name__}: "
                                f"{e})") from e
    implicit = None  # an unannotated first `self` / `cls` is the receiver, not an argument
    if params and params[0].name in ("self", "cls") and params[0].annotation is inspect.Parameter.empty:
        implicit, params = params[0].name, params[1:]
    required = []
    for p in params:
        if p.annotation is inspect.Parameter.empty:
            raise ChatTemplateError(f"tool {name}: argument {p.name} has no type hint")
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    properties = {}
    for arg, hint in hints.items():
        if arg == implicit:
            continue
        if arg == "return":
            try:
                properties["return"] = _type_hint_schema(hint, name)
            except ChatTemplateError:
                pass
        else:
            properties[arg] = _type_hint_schema(hint, name)
    parameters = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return_schema = properties.pop("return", None)
    if return_schema is not None and returns_doc is not None:
        return_schema["description"] = returns_doc
    for arg, schema in properties.items():
        if arg not in arg_docs:
            raise ChatTemplateError(f"tool {name}: the docstring has no description for argument {arg!r}")
        desc = arg_docs[arg]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", desc, flags=re.IGNORECASE)
        if choices:
            try:
                values = json.loads(choices.group(1))
            except ValueError as e:
                raise ChatTemplateError(f"tool {name}: argument {arg!r}: the docstring's (choices: ...) must be a "
                                        f"JSON list, found {choices.group(1)!r} ({e})") from None
            if not isinstance(values, list):
                raise ChatTemplateError(f"tool {name}: argument {arg!r}: the docstring's (choices: ...) must be a "
                                        f"JSON list, found {choices.group(1)!r}")
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in values]
            desc = choices.string[: choices.start()].strip()
        schema["description"] = desc
    out = {"name": name, "description": description, "parameters": parameters}
    if return_schema is not None:
        out["return"] = return_schema
    return {"type": "function", "function": out}


def _enum_schema(values):
    kinds = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _type_hint_schema(hint, func_name):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [member.value for member in hint]
        if not values or any(type(v) not in _JSON_SCALARS for v in values):
            raise ChatTemplateError(f"tool {func_name}: Enum {hint.__name__} needs JSON scalar member values")
        return _enum_schema(values)
    if origin is None:
        if hint not in _BASIC_TYPES:
            raise ChatTemplateError(
                f"tool {func_name}: cannot convert the type hint {hint!r} to a JSON schema; use basic "
                f"types, Enum, Literal, list, tuple, dict or unions of those, or pass a schema dict"
            )
        return dict(_BASIC_TYPES[hint])
    if origin is typing.Union or origin is types.UnionType:
        subtypes = [_type_hint_schema(t, func_name) for t in args if t is not type(None)]
        if len(subtypes) == 1:
            out = subtypes[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subtypes):
            names = sorted({s["type"] for s in subtypes})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subtypes}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is typing.Literal and args:
        if any(type(a) not in _JSON_SCALARS for a in args):
            raise ChatTemplateError(f"tool {func_name}: Literal values must be JSON scalars")
        return _enum_schema(list(args))
    if origin is list:
        return {"type": "array", "items": _type_hint_schema(args[0], func_name)} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise ChatTemplateError(f"tool {func_name}: use list[...] rather than {hint} for a variable-length input")
        return {"type": "array", "prefixItems": [_type_hint_schema(t, func_name) for t in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _type_hint_schema(args[1], func_name)
        return out
    raise ChatTemplateError(f"tool {func_name}: cannot convert the type hint {hint!r} to a JSON schema")
