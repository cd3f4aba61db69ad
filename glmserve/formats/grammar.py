"""JSON schema -> xgrammar pieces, and the tool_choice constraints of the JSON-call formats.

Each tool's ``parameters`` becomes an xgrammar grammar with no free whitespace
(``any_whitespace=False``: ``", "`` / ``": "`` separators, GLM's own style).  The call
syntax around it is composed with xgrammar structural-tag *formats* (sequence, or, plus,
const strings, any text) and compiled to one EBNF text with
``Grammar.from_structural_tag``; xgrammar renames the rules of every embedded grammar, and
the EBNF is what vLLM gets (``StructuredOutputsParams(grammar=...)``).  A JSON part is
never a ``json_schema`` format, because vLLM ignores ``disable_any_whitespace`` there.

Built constraints are cached per canonical JSON of (format, tools, tool_choice,
parallel_tool_calls): ``functools.lru_cache`` on that key.

Shapes (``C`` = one call of any allowed tool, ``C+`` = one or more run together):

* GLM-4 / GLM-4-0414: ``C = name "\\n" args``; required ``C+`` (``C`` when
  ``parallel_tool_calls`` is false); named: exactly that call; auto: ``"\\n" any-text | C+``.
  Calls run together without ``<|assistant|>`` (special tokens are never generated under
  a grammar); the parser accepts that.  A declared built-in (``python``,
  ``simple_browser``, ``cogview`` with no ``parameters``) may also take a raw text body,
  as the last call only.
* GLM-Z1: ``any-text-without-</think> "</think>"``, up to two ``\\n``, then the
  GLM-4-0414 shape (the auto text branch without the leading ``\\n``).
* ChatML/Hermes: ``C = "<tool_call>\\n{\\"name\\": \\"N\\", \\"arguments\\": " args "}\\n</tool_call>"``;
  required ``C ("\\n" C)*``; auto: free text with triggered tags on ``<tool_call>``.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any

from glmserve.formats.base import ChatRequest, Constraint

log = logging.getLogger(__name__)

ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
BUILTIN_TOOLS = frozenset({"python", "simple_browser", "cogview"})


def _normalise_schema(schema: Any) -> dict[str, Any]:
    """No schema, or an object schema naming no properties, means any object."""
    if not isinstance(schema, dict) or not schema:
        return dict(ANY_OBJECT)
    if schema.get("type") == "object" and "properties" not in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": True}
    return schema


@lru_cache(maxsize=1024)
def schema_grammar(schema_json: str) -> str:
    """EBNF of the arguments object for one schema (canonical JSON text), no free whitespace."""
    import xgrammar as xg

    schema = _normalise_schema(json.loads(schema_json))
    try:
        return str(xg.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
    except Exception as exc:  # unsupported schema feature: fall back to any object
        log.warning("JSON schema not supported by xgrammar (%s); allowing any object", exc)
        return str(xg.Grammar.from_json_schema(ANY_OBJECT, any_whitespace=False))


def _canonical(obj: Any) -> str:
    # No sort_keys: xgrammar follows the order of "properties", so order is meaningful.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _key(request: ChatRequest, fmt: str) -> str | None:
    """Canonical cache key, or None when decoding is free."""
    tools = request.tools_in_prompt
    if request.tool_choice == "none" or not tools:
        return None
    choice = request.tool_choice
    if choice not in ("auto", "required"):
        if choice not in {t.name for t in tools}:
            raise ValueError(f"tool_choice names {choice!r}, which is not a declared tool")
        tools = [t for t in tools if t.name == choice]
    spec = {
        "fmt": fmt,
        "tools": [[t.name, t.parameters] for t in tools],
        "choice": "auto" if choice == "auto" else "one" if choice != "required" else "required",
        "parallel": bool(request.parallel_tool_calls),
    }
    return _canonical(spec)


def _compile(fmt_obj: Any) -> str:
    import xgrammar as xg
    from xgrammar import structural_tag as st

    return str(xg.Grammar.from_structural_tag(st.StructuralTag(format=fmt_obj)))


# --------------------------------------------------------------------------- GLM


def glm_constraint(request: ChatRequest, reasoning: bool = False) -> Constraint | None:
    key = _key(request, "glmz1" if reasoning else "glm")
    return None if key is None else Constraint(grammar=_build_glm(key))


@lru_cache(maxsize=256)
def _build_glm(key: str) -> str:
    from xgrammar import structural_tag as st

    spec = json.loads(key)
    reasoning = spec["fmt"] == "glmz1"
    json_calls = []
    raw_calls = []
    for name, params in spec["tools"]:
        json_calls.append(
            st.SequenceFormat(
                elements=[
                    st.ConstStringFormat(value=name + "\n"),
                    st.GrammarFormat(grammar=schema_grammar(_canonical(params))),
                ]
            )
        )
        if name in BUILTIN_TOOLS and not params:
            raw_calls.append(
                st.SequenceFormat(elements=[st.ConstStringFormat(value=name + "\n"), st.AnyTextFormat()])
            )
    one = _or(json_calls + raw_calls)
    if spec["choice"] == "one" or not spec["parallel"]:
        calls = one
    elif raw_calls:
        calls = st.SequenceFormat(elements=[st.StarFormat(content=_or(json_calls)), one])
    else:
        calls = st.PlusFormat(content=_or(json_calls))
    if spec["choice"] == "auto":
        text = st.AnyTextFormat() if reasoning else st.SequenceFormat(
            elements=[st.ConstStringFormat(value="\n"), st.AnyTextFormat()]
        )
        body = st.OrFormat(elements=[text, calls])
    else:
        body = calls
    if reasoning:
        body = st.SequenceFormat(
            elements=[
                st.AnyTextFormat(excludes=["</think>"]),
                st.ConstStringFormat(value="</think>"),
                # up to two newlines of layout, which the parser drops
                st.OptionalFormat(content=st.ConstStringFormat(value="\n")),
                st.OptionalFormat(content=st.ConstStringFormat(value="\n")),
                body,
            ]
        )
    return _compile(body)


def _or(items: list[Any]) -> Any:
    from xgrammar import structural_tag as st

    return items[0] if len(items) == 1 else st.OrFormat(elements=items)


# --------------------------------------------------------------------------- ChatML / Hermes

HERMES_OPEN = "<tool_call>"


def hermes_call_begin(name: str) -> str:
    return HERMES_OPEN + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


HERMES_CALL_END = "}\n</tool_call>"


def chatml_constraint(request: ChatRequest) -> Constraint | None:
    key = _key(request, "chatml")
    return None if key is None else Constraint(grammar=_build_chatml(key))


@lru_cache(maxsize=256)
def _build_chatml(key: str) -> str:
    from xgrammar import structural_tag as st

    spec = json.loads(key)
    tags = [
        st.TagFormat(
            begin=hermes_call_begin(name),
            content=st.GrammarFormat(grammar=schema_grammar(_canonical(params))),
            end=HERMES_CALL_END,
        )
        for name, params in spec["tools"]
    ]
    if spec["choice"] == "auto":
        return _compile(
            st.TriggeredTagsFormat(triggers=[HERMES_OPEN], tags=tags, stop_after_first=not spec["parallel"])
        )
    one = _or(tags)
    if spec["choice"] == "one" or not spec["parallel"]:
        return _compile(one)
    more = st.StarFormat(content=st.SequenceFormat(elements=[st.ConstStringFormat(value="\n"), one]))
    return _compile(st.SequenceFormat(elements=[one, more]))


def clear_caches() -> None:
    """Forget built constraints (tests measure cold build time with it)."""
    schema_grammar.cache_clear()
    _build_glm.cache_clear()
    _build_chatml.cache_clear()
