"""A Python function as a tool definition: its JSON schema from type hints, its descriptions from
the docstring.

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
        '''The current weather in a city.

        Args:
            city: The city, e.g. "Paris".
            unit: Temperature unit.
        '''

becomes {"name": "get_weather", "description": "The current weather in a city.", "parameters":
{"type": "object", "properties": {"city": {"type": "string", "description": ...}, "unit":
{"type": "string", "enum": [...], "default": "celsius", ...}}, "required": ["city"],
"additionalProperties": false}}. The docstring's text before its first section is the
description; the `Args:` section (Google style, as transformers' `get_json_schema` reads it;
reST `:param x:` lines too) describes the parameters. Parameters with defaults are optional.
Types: str, int, float, bool, None, list[X], tuple[X, ...], tuple[X, Y], dict[str, X],
Literal[...], Enum subclasses, X | Y / Optional[X], dataclasses and TypedDicts (nested
objects), Any. Anything else is refused with BadRequest naming the parameter: a schema we could
not be sure of would let the model call the function with arguments it cannot take.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from .errors import BadRequest

SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}


def function_definition(fn: Callable) -> dict:
    """{"name", "description", "parameters"} for a Python function (see the module docstring)."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or name == "<lambda>":
        raise BadRequest("a tool function needs a name: define it with `def`, not lambda")
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=False)
    except (TypeError, ValueError, NameError) as e:
        raise BadRequest(f"cannot read the signature of tool function {name} ({e}): give it "
                         "plain type hints") from e
    description, params_doc = parse_docstring(inspect.getdoc(fn) or "")
    properties: dict[str, Any] = {}
    required = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise BadRequest(f"tool function {name} takes *{param.name}: the model can only "
                             "pass named arguments; list them as parameters")
        if param.kind == param.POSITIONAL_ONLY:
            raise BadRequest(f"tool function {name}: parameter {param.name} is positional-only; "
                             "the model passes arguments by name")
        if param.name not in hints:
            raise BadRequest(f"tool function {name}: parameter {param.name} has no type hint "
                             "(the JSON schema comes from it): add one, e.g. `str`")
        where = f"tool function {name}, parameter {param.name}"
        schema = type_schema(hints[param.name], where)
        if param.name in params_doc:
            schema["description"] = params_doc[param.name]
        if param.default is param.empty:
            required.append(param.name)
        else:
            schema["default"] = json_default(param.default, where)
        properties[param.name] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    parameters["additionalProperties"] = False
    definition: dict[str, Any] = {"name": name}
    if description:
        definition["description"] = description
    definition["parameters"] = parameters
    return definition


def type_schema(hint: Any, where: str) -> dict:
    """The JSON schema of one type hint."""
    if hint is Any:
        return {}
    if hint is None or hint is type(None):
        return {"type": "null"}
    if hint in SIMPLE:
        return {"type": SIMPLE[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return enum_schema([member.value for member in hint], where)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return record_schema(hint, {f.name: f for f in dataclasses.fields(hint)}, where)
    if typing.is_typeddict(hint):
        return record_schema(hint, None, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return enum_schema(list(args), where)
    if origin in (typing.Union, types.UnionType):
        options = [type_schema(arg, where) for arg in args]
        return {"anyOf": options}
    if origin is list or hint is list:
        return {"type": "array", "items": type_schema(args[0], where) if args else {}}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": type_schema(args[0], where)}
        items = [type_schema(arg, where) for arg in args]
        return {"type": "array", "prefixItems": items, "items": False,
                "minItems": len(items), "maxItems": len(items)}
    if origin is dict or hint is dict:
        if args and args[0] is not str:
            raise BadRequest(f"{where}: JSON object keys are strings, so use dict[str, ...] "
                             f"(got {_name(hint)})")
        return {"type": "object", "additionalProperties": type_schema(args[1], where)
                if args else True}
    raise BadRequest(f"{where}: the type {_name(hint)} has no JSON schema; use str, int, float, "
                     "bool, list, tuple, dict, Literal, an Enum, a dataclass or a TypedDict")


def enum_schema(values: list, where: str) -> dict:
    kinds = {type(v) for v in values}
    for v in values:
        if not isinstance(v, (str, int, float, bool, type(None))):
            raise BadRequest(f"{where}: choice {v!r} is not a JSON value")
    schema: dict[str, Any] = {"enum": values}
    if len(kinds) == 1 and (kind := next(iter(kinds))) in SIMPLE:
        schema = {"type": SIMPLE[kind], "enum": values}
    return schema


def record_schema(cls: type, fields: dict | None, where: str) -> dict:
    """A dataclass or TypedDict as a nested object: fields with defaults (dataclass) or not
    Required (TypedDict, total=False) are optional."""
    hints = typing.get_type_hints(cls)
    properties = {name: type_schema(hint, f"{where}, field {name}")
                  for name, hint in hints.items()}
    if fields is not None:
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
    else:
        required = [n for n in hints if n in getattr(cls, "__required_keys__", hints)]
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def json_default(value: Any, where: str) -> Any:
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_default(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: json_default(v, where) for k, v in value.items()}
    raise BadRequest(f"{where}: its default {value!r} is not a JSON value")


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Returns?|Raises|Yields|Examples?|"
                      r"Notes?)\s*:\s*$")
_ARG = re.compile(r"^\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_REST = re.compile(r"^\s*:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")
ARGS_SECTIONS = ("args", "arguments", "parameters", "params")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The description (the text before the first section, each paragraph on one line) and
    each parameter's description (Google-style `Args:` entries with their continuation lines,
    or reST `:param name:` lines)."""
    description: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    entry_indent: int | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        rest = _REST.match(line)
        header = _SECTION.match(stripped)
        if rest:
            section, current = "rest", rest.group(1)
            params[current] = rest.group(2).strip()
        elif header:
            section, current, entry_indent = header.group(1).lower(), None, None
        elif section is None:
            description.append(stripped)
        elif section in ARGS_SECTIONS:
            entry = _ARG.match(line)
            if entry and (entry_indent is None or _indent(line) <= entry_indent):
                entry_indent, current = _indent(line), entry.group(1)
                params[current] = entry.group(2).strip()
            elif current and stripped:
                params[current] = f"{params[current]} {stripped}".strip()
        elif section == "rest" and current and stripped and not stripped.startswith(":"):
            params[current] = f"{params[current]} {stripped}".strip()
    paragraphs = " ".join(line or "\n" for line in description).split("\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip()), params


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)
