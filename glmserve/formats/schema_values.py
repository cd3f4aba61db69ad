"""Typing an untyped argument text by its JSON schema (the XML call families).

GLM-4.5/4.7 write ``<arg_value>7</arg_value>``: strings raw, everything else as JSON, and
no type marker.  The tool's schema decides what such a text means.  This module holds the
two halves of that decision, shared by the parser and the constraint builder so that the
grammar and the decoder read every schema the same way:

* :func:`resolve_refs` inlines local ``$ref`` / ``$defs`` / ``definitions`` (Pydantic writes
  enums, ``Optional`` models and nested models this way).  A reference that is already
  being expanded on the current path may be re-entered :data:`MAX_REF_REPEAT` times; past
  that (a recursive model deeper than the bound, or a pure ``$ref`` cycle) it becomes the
  empty schema, as does a reference to another document (xgrammar treats those as "any
  value" too).  A local reference that points nowhere is a ``ValueError`` (the request's
  fault).  :data:`MAX_REF_EXPANSIONS` bounds the total work per schema.
* :func:`read_value` chooses the reading of a text that validates against the (resolved)
  property schema, checked with ``jsonschema``:

  1. the JSON reading of the stripped text, when it is not a string and is valid;
  2. the raw text as a string, when valid, then the stripped text;
  3. the JSON reading when it is a string (the text was a quoted JSON string), when valid;
     it comes after the raw text because the templates write strings raw, so a quoted
     text is a string that contains the quotes whenever that is allowed;
  4. a number parsed from a quoted number (``"42"``), when valid;
  5. a Python literal (``True``, ``None``, ``'x'``), when valid;
  6. nothing valid: the JSON reading if the text parses, else the raw text, and the value
     is reported as schema-invalid.

  A property with no schema (or an empty one) keeps the schema-free reading: JSON, else
  a Python literal, else the raw text.  A *free* string (``{"type": "string"}`` with no
  enum, pattern, length or format) is always its raw text, which is why the parser can
  stream it as it arrives; every other value needs its whole text.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema


class UnreadableSchema(ValueError):
    """A tool schema that cannot be read at all (a local ``$ref`` pointing nowhere): the
    request's fault, unlike any other error while building a constraint."""

MAX_REF_REPEAT = 3
"""How many times one ``$ref`` target may be nested inside itself before it is cut off."""
MAX_REF_EXPANSIONS = 2000
"""Total ``$ref`` expansions per schema; later references become the empty schema."""

_ROOT_URI = "urn:glmserve:tool-parameters"
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly", "$schema", "$id"}
)
# Keywords whose value is one schema, a list of schemas, or a name -> schema map.  Every
# other keyword is data (enum, const, default...) and is copied untouched.
_ONE = frozenset({
    "additionalProperties", "additionalItems", "items", "contains", "not", "if", "then", "else",
    "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema",
})
_MANY = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAP = frozenset({"properties", "patternProperties", "dependentSchemas"})
# Keywords that can make a string invalid; a string schema without them is "free".
_STRING_LIMITS = frozenset({
    "enum", "const", "pattern", "minLength", "maxLength", "format", "contentEncoding", "contentMediaType",
    "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
})


# --------------------------------------------------------------------------- $ref resolution


def resolve_refs(schema: Any) -> Any:
    """``schema`` with every local ``$ref`` replaced by its target (bounded; see module doc)."""
    if not isinstance(schema, dict):
        return schema
    resource = referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)
    resolver = referencing.Registry().with_resource(_ROOT_URI, resource).resolver(base_uri=_ROOT_URI)
    return _Resolver().walk(schema, resolver)


@dataclass
class _Resolver:
    active: dict[int, int] = field(default_factory=dict)  # target id -> times on the current path
    budget: int = MAX_REF_EXPANSIONS

    def walk(self, node: Any, resolver: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k in ("$ref", "$defs", "definitions"):
                continue  # references are inlined below, so their targets are not needed
            if k in _ONE:
                out[k] = [self.walk(x, resolver) for x in v] if isinstance(v, list) else self.walk(v, resolver)
            elif k in _MANY and isinstance(v, list):
                out[k] = [self.walk(x, resolver) for x in v]
            elif k in _MAP and isinstance(v, dict):
                out[k] = {name: self.walk(x, resolver) for name, x in v.items()}
            elif k == "dependencies" and isinstance(v, dict):
                out[k] = {name: self.walk(x, resolver) if isinstance(x, dict) else x for name, x in v.items()}
            else:
                out[k] = v
        ref = node.get("$ref")
        if not isinstance(ref, str):
            return out
        target = self._target(ref, resolver)
        if all(k in _ANNOTATIONS for k in out):
            return target  # the usual Pydantic shape: {"$ref": ..., "description": ...}
        return {"allOf": [target], **out}  # $ref next to constraints: both apply

    def _target(self, ref: str, resolver: Any) -> Any:
        try:
            resolved = resolver.lookup(ref)
        except referencing.exceptions.Unresolvable:
            if ref.startswith("#"):
                raise UnreadableSchema(f"$ref {ref!r} points nowhere in the schema") from None
            return {}  # not local: nothing to check it against (xgrammar reads it as any value)
        key = id(resolved.contents)
        seen = self.active.get(key, 0)
        if seen >= MAX_REF_REPEAT or self.budget <= 0:
            return {}
        self.budget -= 1
        self.active[key] = seen + 1
        try:
            return self.walk(resolved.contents, resolved.resolver)
        finally:
            self.active[key] = seen


# --------------------------------------------------------------------------- one property


def is_free_string(schema: Any) -> bool:
    """A plain string (``type: string``, nothing that limits it): any raw text is valid."""
    return isinstance(schema, dict) and schema.get("type") == "string" and not any(k in schema for k in _STRING_LIMITS)


def _unconstrained(schema: Any) -> bool:
    return schema is True or (isinstance(schema, dict) and all(k in _ANNOTATIONS for k in schema))


class ValueSchema:
    """One argument's resolved schema, with its validator."""

    def __init__(self, schema: Any, validator_cls: type) -> None:
        self.schema = schema
        self.free_string = is_free_string(schema)
        self._validator = validator_cls(schema)

    def valid(self, value: Any) -> bool:
        try:
            return bool(self._validator.is_valid(value))
        except RecursionError:  # a value nested deeper than Python can follow
            return False


class ToolSchemas:
    """The argument schemas of one tool, resolved once and looked up per argument name."""

    def __init__(self, parameters: Any) -> None:
        try:
            self.root = resolve_refs(parameters) if isinstance(parameters, dict) else None
        except ValueError:
            self.root = None  # a dangling $ref (refused when the constraint is built): schema-free
        self._validator_cls: Any = None
        if self.root is not None:
            cls = jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator)
            try:
                cls.check_schema(self.root)
            except jsonschema.exceptions.SchemaError:
                self.root = None  # a malformed schema checks nothing; values read schema-free
            else:
                self._validator_cls = cls
        self._values: dict[str, ValueSchema | None] = {}

    def schema_of(self, key: str) -> Any:
        """The resolved schema of argument ``key`` (None: the parameters do not say)."""
        root = self.root
        if not isinstance(root, dict):
            return None
        props = root.get("properties")
        if isinstance(props, dict) and key in props:
            return props[key]
        patterns = root.get("patternProperties")
        if isinstance(patterns, dict):
            for pattern, schema in patterns.items():
                try:
                    if re.search(pattern, key):
                        return schema
                except re.error:
                    continue
        extra = root.get("additionalProperties")
        return extra if isinstance(extra, dict) else None

    def value(self, key: str) -> ValueSchema | None:
        """The value schema of argument ``key``; None when no schema constrains it."""
        if key not in self._values:
            schema = self.schema_of(key)
            self._values[key] = None if schema is None or _unconstrained(schema) else ValueSchema(
                schema, self._validator_cls)
        return self._values[key]


@lru_cache(maxsize=512)
def tool_schemas(parameters_json: str) -> ToolSchemas:
    """:class:`ToolSchemas` for a tool's parameters (canonical JSON text), built once."""
    return ToolSchemas(json.loads(parameters_json))


def schemas_for(parameters: Any) -> ToolSchemas:
    return tool_schemas(json.dumps(parameters, ensure_ascii=False, separators=(",", ":")))


# --------------------------------------------------------------------------- reading a text

_MISSING: Any = object()
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_MAX_LITERAL = 100_000


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_reading(text: str) -> Any:
    """``json.loads`` of the text, or ``_MISSING`` (NaN / Infinity are not JSON)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _MISSING


def _literal_reading(text: str) -> Any:
    if len(text) > _MAX_LITERAL:
        return _MISSING
    try:
        value = ast.literal_eval(text)
        json.dumps(value, allow_nan=False)  # must be representable as JSON
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING
    return value


def read_value(raw: str, schema: ValueSchema | None) -> tuple[Any, bool]:
    """``(value, valid)``: the reading of an argument text chosen by its schema (module doc)."""
    if schema is None:
        text = raw.strip()
        value = json_reading(text)
        if value is _MISSING:
            value = _literal_reading(text)
        return (raw if value is _MISSING else value), True
    if schema.free_string:
        return raw, True
    text = raw.strip()
    parsed = json_reading(text)
    if parsed is not _MISSING and not isinstance(parsed, str) and schema.valid(parsed):
        return parsed, True
    if schema.valid(raw):
        return raw, True
    if text != raw and schema.valid(text):
        return text, True
    if isinstance(parsed, str):
        if schema.valid(parsed):
            return parsed, True
        if _NUMBER.fullmatch(parsed):
            number = json.loads(parsed)
            if schema.valid(number):
                return number, True
    literal = _literal_reading(text)
    if literal is not _MISSING and schema.valid(literal):
        return literal, True
    return (raw if parsed is _MISSING else parsed), False


__all__ = [
    "MAX_REF_EXPANSIONS",
    "MAX_REF_REPEAT",
    "ToolSchemas",
    "ValueSchema",
    "is_free_string",
    "json_reading",
    "read_value",
    "resolve_refs",
    "schemas_for",
    "tool_schemas",
]
