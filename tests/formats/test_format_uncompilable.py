"""One rule for tool schemas xgrammar cannot compile, the same in every family.

A ``strict: true`` tool: :class:`UncompilableSchema` naming ``tools[i].function.parameters``
(the API answers 400).  Any other tool: its arguments are constrained to any JSON object,
it is listed in ``Constraint.relaxed``, and one warning is logged per tool set.  The other
tools of the request keep their schemas.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import xgrammar as xg
from xgrammar.testing import _is_grammar_accept_string

from glmserve.formats import FORMATS, get_format
from glmserve.formats.base import ChatRequest, Tool
from glmserve.formats.grammar import UncompilableSchema, clear_caches
from glmserve.formats.xmlcall import write_call

GOOD = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
# Valid JSON Schema (jsonschema accepts both), but xgrammar refuses them.
UNCOMPILABLE = {
    "lookbehind": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}},
    "dangling_ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    "empty_range": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}},
}
FAMILIES = sorted(FORMATS)


def tool(name: str, params: dict[str, Any], strict: bool | None) -> Tool:
    fn: dict[str, Any] = {"name": name, "parameters": params}
    if strict is not None:
        fn["strict"] = strict
    return Tool.from_openai({"type": "function", "function": fn})


def request(bad: Tool, tool_choice: str = "required") -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "x"}], tools=[tool("good", GOOD, True), bad],
                       tool_choice=tool_choice, enable_thinking=False)


def call(fmt: str, name: str, args: str) -> str:
    """One call as the family writes it (thinking off), ``args`` a JSON object text."""
    if fmt == "chatml":
        return '<tool_call>\n{"name": "' + name + '", "arguments": ' + args + "}\n</tool_call>"
    lead = "</think>" if fmt in ("glmz1", "glm53") else ""  # GLM-Z1 and GLM-5.3 output opens inside reasoning
    if fmt in ("glm45", "glm47", "glm51", "glm53"):
        return lead + write_call(name, json.loads(args), newlines=fmt == "glm45")
    return lead + name + "\n" + args


def accepts(grammar: str, text: str) -> bool:
    return _is_grammar_accept_string(xg.Grammar.from_ebnf(grammar), text)


@pytest.mark.parametrize("schema", sorted(UNCOMPILABLE))
@pytest.mark.parametrize("fmt", FAMILIES)
def test_strict_tool_is_refused_naming_its_parameters(fmt: str, schema: str) -> None:
    with pytest.raises(UncompilableSchema) as info:
        get_format(fmt).constraint(request(tool("bad", UNCOMPILABLE[schema], True)))
    assert isinstance(info.value, ValueError)
    assert info.value.param == "tools[1].function.parameters" and info.value.index == 1
    assert "bad" in str(info.value)


@pytest.mark.parametrize("schema", sorted(UNCOMPILABLE))
@pytest.mark.parametrize("fmt", FAMILIES)
def test_non_strict_tool_falls_back_to_any_object(fmt: str, schema: str, caplog: pytest.LogCaptureFixture) -> None:
    clear_caches()
    f = get_format(fmt)
    req = request(tool("bad", UNCOMPILABLE[schema], None))
    with caplog.at_level(logging.WARNING, logger="glmserve.formats.grammar"):
        c = f.constraint(req)
        again = f.constraint(req)
    assert c is not None and c.grammar and c == again
    assert c.relaxed == ("bad",)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'bad'" in warnings[0].getMessage()  # once per tool set
    # The relaxed tool takes any object; the other tool keeps its schema.
    assert accepts(c.grammar, call(fmt, "bad", '{"a": "zzz", "other": [1, 2]}'))
    assert accepts(c.grammar, call(fmt, "good", '{"n": 3}'))
    assert not accepts(c.grammar, call(fmt, "good", '{"n": "three"}'))
    if fmt not in ("glm45", "glm47", "glm51", "glm53"):  # XML calls can only write objects
        assert not accepts(c.grammar, call(fmt, "bad", "[1]"))


@pytest.mark.parametrize("fmt", FAMILIES)
def test_fallback_is_reported_only_for_constrained_tools(fmt: str) -> None:
    f = get_format(fmt)
    assert f.constraint(request(tool("bad", UNCOMPILABLE["lookbehind"], None), tool_choice="good")).relaxed == ()
    assert f.constraint(request(tool("bad", UNCOMPILABLE["lookbehind"], None), tool_choice="bad")).relaxed == ("bad",)
    c = f.constraint(request(tool("bad", UNCOMPILABLE["lookbehind"], False)))  # strict: false is not strict
    assert c is not None and c.relaxed == ("bad",)
    assert accepts(c.grammar, call(fmt, "bad", '{"a": "zzz"}'))
    assert f.constraint(request(tool("bad", UNCOMPILABLE["lookbehind"], True), tool_choice="none")) is None


@pytest.mark.parametrize("strict", [False, None, True])
@pytest.mark.parametrize("fmt", FAMILIES)
def test_a_compilable_schema_is_enforced_whatever_strict_says(fmt: str, strict: bool | None) -> None:
    c = get_format(fmt).constraint(request(tool("other", GOOD, strict)))
    assert c is not None and c.relaxed == ()
    assert accepts(c.grammar, call(fmt, "other", '{"n": 1}'))
    assert not accepts(c.grammar, call(fmt, "other", '{"n": "one"}'))
