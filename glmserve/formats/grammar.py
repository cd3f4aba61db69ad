"""The xgrammar kit every family's decoding constraint is built with.

A family turns a request into a constraint in three steps, two of them here:

1. :func:`constraint_key` reads ``tool_choice`` (already normalised by the API to
   ``none`` / ``auto`` / ``required`` / a tool name), checks a named tool once, and
   decides each tool's argument schema by one rule for every family:

   * no ``parameters``: any JSON object (``null`` in the key);
   * a schema the family's xgrammar style compiles: that schema, whatever ``strict`` says
     (arguments valid against the schema is what glmserve promises);
   * a schema it cannot compile: for a ``strict: true`` tool an
     :class:`UncompilableSchema` (the API answers 400 naming the field), for any other
     tool any JSON object, with one warning per tool set and the tool's name listed in
     :attr:`Constraint.relaxed` so the API can count it.

   The key is canonical JSON (no ``sort_keys``: xgrammar follows the order of
   ``properties``, so order is meaningful), so equal requests share one built grammar.
2. The family builds its grammar from the key, in a function wrapped with :func:`cached`.
3. :func:`clear_caches` forgets every built grammar and compile check at once (tests
   measure cold build time with it).

Schemas become grammars with no free whitespace (``any_whitespace=False``: ``", "`` /
``": "`` separators, GLM's own style).  Call syntax around them is composed with xgrammar
structural-tag formats and compiled to one EBNF text (:func:`compile_format`), which is
what vLLM gets (``StructuredOutputsParams(grammar=...)``).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from glmserve.formats.base import ChatRequest, Constraint
from glmserve.formats.caches import cache_misses, cached, clear_caches  # noqa: F401  (where the formats and the API find them)

log = logging.getLogger(__name__)

ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


class UncompilableSchema(ValueError):
    """A ``strict: true`` tool whose parameters xgrammar cannot compile.

    ``param`` names the offending field for the API's 400 answer.
    """

    def __init__(self, index: int, name: str, error: str) -> None:
        self.index = index
        self.name = name
        self.param = f"tools[{index}].function.parameters"
        self.reason = f"tool {name!r} is strict, but xgrammar cannot compile its schema: {error}"
        super().__init__(f"{self.param}: {self.reason}")


class ToolChoiceUnavailable(ValueError):
    """A ``tool_choice`` that no callable tool can satisfy (a name not declared, ``required``
    when every tool is still deferred): the client's error, unlike other ``ValueError`` exceptions
    raised while building a grammar."""


def canonical(obj: Any) -> str:
    """Compact JSON keeping key order (xgrammar follows the order of ``properties``)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


SchemaCheck = Callable[[str], "str | None"]
"""A family's compile check: canonical schema JSON -> None, or why xgrammar refuses it.
Wrap it with :func:`cached` so each schema is compiled once."""


def normalise_schema(schema: Any) -> dict[str, Any]:
    """No schema, or an object schema naming no properties, means any object."""
    if not isinstance(schema, dict) or not schema:
        return dict(ANY_OBJECT)
    if schema.get("type") == "object" and "properties" not in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": True}
    return schema


@cached(maxsize=1024)
def schema_grammar(schema_json: str) -> str:
    """EBNF of the arguments object for one schema (canonical JSON), no free whitespace.

    Raises ``RuntimeError`` / ``ValueError`` when xgrammar cannot compile it."""
    import xgrammar as xg

    schema = normalise_schema(json.loads(schema_json))
    return str(xg.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))


@cached(maxsize=1024)
def json_schema_check(schema_json: str) -> str | None:
    """The compile check of the families whose arguments are plain JSON objects."""
    try:
        schema_grammar(schema_json)
    except (RuntimeError, ValueError) as exc:  # xgrammar's C++ errors arrive as RuntimeError
        return str(exc).strip()
    return None


@cached(maxsize=256)
def _tool_schemas(check: SchemaCheck, tools_json: str) -> tuple[tuple[Any, ...], tuple[str, ...], tuple[int, str, str] | None]:
    """Each tool's schema under the rule of the module docstring: ``(schemas, relaxed, refused)``.

    ``refused`` is the first strict tool that does not compile ``(index, name, reason)``;
    it is returned, not raised, so the verdict is cached too."""
    schemas: list[Any] = []
    relaxed: list[str] = []
    for i, (name, params, strict) in enumerate(json.loads(tools_json)):
        if not isinstance(params, dict):
            schemas.append(None)
            continue
        reason = check(canonical(params))
        if reason is None:
            schemas.append(params)
        elif strict:
            return (), (), (i, name, reason)
        else:
            schemas.append(None)
            relaxed.append(name)
            log.warning("tool %r: xgrammar cannot compile its parameters (%s); its arguments are only "
                        "constrained to a JSON object", name, reason)
    return tuple(schemas), tuple(relaxed), None


def constraint_key(request: ChatRequest, family: str, check: SchemaCheck, **extra: Any) -> tuple[str, tuple[str, ...]] | None:
    """``(canonical key, relaxed tool names)`` of the constraint a request needs, or None
    when decoding is free.

    The key is ``{"family", "tools": [[name, schema or null]...], "choice": "auto" |
    "required" | "named", "parallel", **extra}``, plus ``"custom": {name: [syntax,
    definition]}`` when a custom tool carries a grammar; for a named choice ``tools`` holds only
    that tool.  Raises ``ValueError`` for a name that is not declared and
    :class:`UncompilableSchema` for a strict tool xgrammar cannot compile.
    """
    tools = request.tools_in_prompt
    choice = request.tool_choice
    if choice == "required" and request.tools and not tools:
        raise ToolChoiceUnavailable("tool_choice 'required' needs a callable tool, but every declared tool is deferred "
                         "(defer_loading) and no tool_reference result has named one")
    if choice == "none" or not tools:
        return None
    named = choice not in ("auto", "required")
    if named and choice not in {t.name for t in tools}:
        raise ToolChoiceUnavailable(f"tool_choice names {choice!r}, which is not among the declared tools")
    schemas, relaxed, refused = _tool_schemas(check, canonical([[t.name, t.parameters, t.strict] for t in tools]))
    if refused is not None:
        raise UncompilableSchema(*refused)
    listed = [[t.name, s] for t, s in zip(tools, schemas) if not named or t.name == choice]
    if named:
        relaxed = tuple(n for n in relaxed if n == choice)
    spec = {
        "family": family,
        "tools": listed,
        "choice": "named" if named else choice,
        "parallel": bool(request.parallel_tool_calls),
        **extra,
    }
    custom = {t.name: list(t.freeform) for t in tools if t.freeform is not None and t.freeform[0] != "text"
              and (not named or t.name == choice)}
    if custom:  # custom tools with a grammar: their input follows it (glmserve.formats.freeform)
        spec["custom"] = custom
    return canonical(spec), relaxed


def build(request: ChatRequest, family: str, check: SchemaCheck, grammar_for_key: Callable[[str], str],
          **extra: Any) -> Constraint | None:
    """The constraint for a request: key, then the family's cached grammar for it."""
    found = constraint_key(request, family, check, **extra)
    if found is None:
        return None
    key, relaxed = found
    return Constraint(grammar=grammar_for_key(key), relaxed=relaxed)


def compile_format(fmt_obj: Any) -> str:
    """A structural-tag format object compiled to EBNF."""
    import xgrammar as xg
    from xgrammar import structural_tag as st

    return str(xg.Grammar.from_structural_tag(st.StructuralTag(format=fmt_obj)))


def custom_grammars(spec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The key's custom tools with a grammar: ``{name: (syntax, definition)}``."""
    return {name: (syntax, definition) for name, (syntax, definition) in spec.get("custom", {}).items()}


def one_of(items: list[Any]) -> Any:
    """The format of exactly one of ``items``."""
    from xgrammar import structural_tag as st

    return items[0] if len(items) == 1 else st.OrFormat(elements=items)


__all__ = ["ANY_OBJECT", "ToolChoiceUnavailable", "UncompilableSchema", "build", "cache_misses", "cached", "canonical",
           "clear_caches", "compile_format", "constraint_key", "custom_grammars", "json_schema_check", "normalise_schema",
           "one_of", "schema_grammar"]
