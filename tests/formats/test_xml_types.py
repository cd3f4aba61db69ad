"""XML tool calls: every value has the type its schema asks for (issue 12).

The XML families write ``<arg_value>7</arg_value>`` with no type, so the tool's schema
decides what a text means.  Golden cases for each behaviour that was once wrong, the
property-based round trip (values generated valid for BFCL and Pydantic schemas, written
as the template writes them, parsed streamed in random pieces and whole, compared with
exact JSON types, and accepted by the family's own constraint grammar), the ``required``
grammar, the parser fixes, and one real-engine check that ``required`` ends after the calls.
"""

from __future__ import annotations

import json
import re
import types
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional, Union

import jsonschema
import pytest
import xgrammar as xgr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
import hypothesis.internal.conjecture.utils as cu
import hypothesis_jsonschema._from_schema as _hjs_from_schema
from hypothesis_jsonschema import from_schema
from pydantic import BaseModel, Field
from xgrammar.testing import _is_grammar_accept_string as accepts

from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, ReasoningEvent, Tool, ToolCallArgs
from glmserve.formats.message import MessageBuilder
from glmserve.formats.schema_values import resolve_refs
from glmserve.formats.xmlcall import VALUE_CLOSE, XmlFormat, write_call


class _LegacyMany:
    """hypothesis-jsonschema 0.23.1 (the latest) drives ``many`` with ``while elements.more()``;
    newer Hypothesis only offers ``with many(...) as elements: for _ in elements``.  This
    adapter gives the old interface on top of the new one (used only when it is missing)."""

    def __init__(self, data: Any, **kw: Any) -> None:
        self._many = cu.many(data, **kw)
        self._many.__enter__()
        self._steps = iter(self._many)

    def more(self) -> bool:
        if next(self._steps, False) is None:
            return True
        self._many.__exit__(None, None, None)
        return False

    def reject(self) -> None:
        self._many.reject()


if not hasattr(cu.many, "more"):
    _hjs_from_schema.cu = types.SimpleNamespace(many=_LegacyMany)

# The XML-call families; the GLM-5 ones join this list when they exist.
FAMILIES = ["glm45", "glm47", "glm51", "glm53"]
DATA = Path(__file__).parents[1] / "data" / "bfcl"


def fmt_of(family: str) -> XmlFormat:
    f = get_format(family)
    assert isinstance(f, XmlFormat)
    return f


def tool(parameters: dict[str, Any], name: str = "f") -> Tool:
    return Tool.from_openai({"type": "function", "function": {"name": name, "parameters": parameters}})


def obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


def output(family: str, calls: list[tuple[str, dict[str, Any]]], thinking: bool = True) -> str:
    """Calls as the model writes them after its reasoning (thinking on) or alone (off)."""
    f = fmt_of(family)
    nl = "\n" if f.style.newlines else ""
    body = "".join(nl + write_call(n, a, newlines=f.style.newlines) for n, a in calls)
    if not thinking and family != "glm53":  # GLM-5.3 always thinks: its template ignores the switch
        return body
    return ("\n<think>r</think>" if f.thinking == "lead" else "r</think>") + body


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(text)]:
        out.append(text[prev:p])
        prev = p
    return out


def parse(family: str, tools: list[Tool], text: str, pieces: list[str] | None = None, thinking: bool = True):
    """(message, parser) for an output fed in ``pieces`` (whole when None)."""
    p = fmt_of(family).parser(ChatRequest(messages=[{"role": "user", "content": "x"}], tools=tools,
                                          enable_thinking=thinking))
    events = []
    for piece in pieces if pieces is not None else [text]:
        events += p.feed(piece)
    events += p.finish()
    b = MessageBuilder()
    b.add(events)
    msg = b.message()
    for i, c in enumerate(msg.get("tool_calls", [])):
        # the streamed fragments are exactly the final arguments
        assert "".join(e.delta for e in events if isinstance(e, ToolCallArgs) and e.index == i) == c["function"]["arguments"]
    return msg, p


def exact(value: Any) -> str:
    """Type-exact comparison key: 7, 7.0, "7" and true all differ."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def read_one(family: str, schema: Any, text: str, *, root: dict[str, Any] | None = None) -> tuple[Any, list[int]]:
    """The value of argument ``v`` written as ``text``, checked streamed (one character at a
    time) and whole; with its parser's ``invalid_calls``."""
    params = dict(root or {})
    params.update(type="object", properties={"v": schema})
    t = tool(params)
    f = fmt_of(family)
    nl = "\n" if f.style.newlines else ""
    out = f"<tool_call>f{nl}<arg_key>v</arg_key>{nl}<arg_value>{text}</arg_value>{nl}</tool_call>"
    results = []
    for pieces in (None, list(out)):
        msg, p = parse(family, [t], out, pieces, thinking=False)
        results.append((exact(json.loads(msg["tool_calls"][0]["function"]["arguments"])["v"]), p.invalid_calls))
    assert results[0] == results[1], "streamed and whole differ"
    return json.loads(results[0][0]), results[0][1]


# --------------------------------------------------------------------------- golden cases

DEFS_ROOT = {"$defs": {
    "Name": {"type": "string", "title": "Name"},
    "Color": {"enum": ["red", "green"], "type": "string", "title": "Color"},
    "Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
}}

GOLDEN: list[tuple[str, Any, str, Any]] = [
    # (case, schema, written text, expected value)
    ("ref-string-null", {"$ref": "#/$defs/Name"}, "null", "null"),
    ("ref-string-7", {"$ref": "#/$defs/Name", "description": "a name"}, "7", "7"),
    ("optional-enum-null", {"anyOf": [{"$ref": "#/$defs/Color"}, {"type": "null"}], "default": None}, "null", None),
    ("optional-enum-member", {"anyOf": [{"$ref": "#/$defs/Color"}, {"type": "null"}]}, "red", "red"),
    ("optional-model", {"anyOf": [{"$ref": "#/$defs/Point"}, {"type": "null"}]}, '{"x": 3}', {"x": 3}),
    ("string-object-7", {"type": ["string", "object"]}, "7", "7"),
    ("object-string-1e2", {"type": ["object", "string"]}, "1e2", "1e2"),
    ("object-string-object", {"type": ["object", "string"]}, '{"a": 1}', {"a": 1}),
    ("oneOf-string-true", {"oneOf": [{"type": "string"}, {"type": "object"}]}, "true", "true"),
    ("anyOf-string-null", {"anyOf": [{"type": "object"}, {"type": "string"}]}, "null", "null"),
    ("string-integer-7", {"type": ["string", "integer"]}, "7", 7),
    ("string-integer-true", {"type": ["string", "integer"]}, "true", "true"),
    ("string-integer-null", {"type": ["string", "integer"]}, "null", "null"),
    ("string-array-1e2", {"type": ["string", "array"]}, "1e2", "1e2"),
    ("string-array-list", {"type": ["string", "array"]}, "[1, 2]", [1, 2]),
    ("enum-7-8-text-7", {"enum": ["7", 8]}, "7", "7"),
    ("enum-7-8-text-8", {"enum": ["7", 8]}, "8", 8),
    ("enum-true-7", {"enum": ["true", 7]}, "true", "true"),
    ("enum-null-7", {"enum": ["null", 7]}, "null", "null"),
    ("nullable-string-null", {"type": ["string", "null"]}, "null", None),
    ("nullable-string-text", {"type": ["string", "null"]}, "nul", "nul"),
    ("nullable-enum-null", {"type": ["string", "null"], "enum": ["ok", None]}, "null", None),
    ("nullable-enum-ok", {"type": ["string", "null"], "enum": ["ok", None]}, "ok", "ok"),
    ("quoted-integer", {"type": "integer"}, '"42"', 42),
    ("quoted-number", {"type": "number"}, ' "4.5" ', 4.5),
    ("quoted-string-stays", {"type": ["string", "integer"]}, '"x"', '"x"'),
    ("quoted-enum-member", {"enum": ["ok", "no"]}, '"ok"', "ok"),
    ("padded-enum", {"type": "string", "enum": ["c", "f"]}, " c\r", "c"),
    ("float-stays-float", {"type": "number"}, "7.0", 7.0),
    ("python-literal", {"type": "boolean"}, "True", True),
    ("free-string-quoted", {"type": "string"}, '"x" ', '"x" '),
    ("no-schema", {}, "[1]", [1]),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case,schema,text,want", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_value(family: str, case: str, schema: Any, text: str, want: Any) -> None:
    value, invalid = read_one(family, schema, text, root=DEFS_ROOT)
    assert exact(value) == exact(want)
    assert invalid == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schema,text,want", [
    ({"type": "integer"}, "abc", "abc"),             # nothing parses: the raw text
    ({"type": "integer"}, "[1]", [1]),               # nothing valid: the JSON reading
    ({"enum": ["a", "b"]}, "NaN", "NaN"),            # NaN is not JSON
    ({"$ref": "#/$defs/Color"}, "blue", "blue"),
])
def test_no_valid_reading_is_counted(family: str, schema: Any, text: str, want: Any) -> None:
    value, invalid = read_one(family, schema, text, root=DEFS_ROOT)
    assert exact(value) == exact(want)
    assert invalid == [0]


@pytest.mark.parametrize("family", FAMILIES)
def test_free_string_through_ref_streams_before_close(family: str) -> None:
    t = tool({**DEFS_ROOT, "type": "object", "properties": {"name": {"$ref": "#/$defs/Name"}}})
    p = fmt_of(family).parser(ChatRequest(messages=[], tools=[t], enable_thinking=False))
    ev = p.feed("<tool_call>f<arg_key>name</arg_key><arg_value>nul")
    assert "".join(e.delta for e in ev if isinstance(e, ToolCallArgs)) == '{"name": "nul'


def test_ref_cycles_are_bounded() -> None:
    pure = {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
            "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}}
    resolved = resolve_refs(pure)
    assert "$ref" not in json.dumps(resolved) and "$defs" not in resolved
    tree = {"type": "object", "properties": {"root": {"$ref": "#/$defs/Node"}},
            "$defs": {"Node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                 "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}}}
    text = json.dumps(resolve_refs(tree))
    assert "$ref" not in text and text.count('"kids"') == 3  # three levels checked, then anything
    for family in FAMILIES:
        value, invalid = read_one(family, {"$ref": "#/$defs/Node"}, '{"v": 1, "kids": [{"v": 2, "kids": []}]}',
                                  root={"$defs": tree["$defs"]})
        assert value == {"v": 1, "kids": [{"v": 2, "kids": []}]} and invalid == []
        value, invalid = read_one(family, {"$ref": "#/$defs/Node"}, '{"v": "x"}', root={"$defs": tree["$defs"]})
        assert invalid == [0]
        assert fmt_of(family).constraint(ChatRequest(messages=[], tools=[tool(pure), tool(tree, "g")],
                                                     tool_choice="required")).grammar


# --------------------------------------------------------------------------- parser fixes


def test_glm47_repeated_think_opener_is_dropped() -> None:
    t = tool(obj(city={"type": "string"}))
    for out in ("<think>plan</think>answer", "\n<think>plan</think>answer"):
        for pieces in (None, list(out)):
            msg, _ = parse("glm47", [t], out, pieces)
            assert msg["reasoning_content"] == "plan" and msg["content"] == "answer"
    msg, _ = parse("glm47", [t], "<thin")  # a lone prefix is still reasoning text
    assert msg["reasoning_content"] == "<thin"


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_call_close_keeps_the_next_call(family: str) -> None:
    t = tool(obj(city={"type": "string"}, n={"type": "integer"}))
    nl = "\n" if fmt_of(family).style.newlines else ""
    first = f"<tool_call>f{nl}<arg_key>city</arg_key>{nl}<arg_value>北京</arg_value>{nl}"  # no </tool_call>
    out = output(family, []) + nl + first + nl + write_call("f", {"n": 2}, newlines=bool(nl))
    for pieces in (None, list(out)):
        msg, p = parse(family, [t], out, pieces)
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]]
        assert calls == [("f", {"city": "北京"}), ("f", {"n": 2})]
        assert not p.incomplete_call and not msg["content"]


def test_glm45_blank_lines_before_think() -> None:
    t = tool(obj(city={"type": "string"}))
    out = "\n\n \n<think>plan</think>\n" + write_call("f", {"city": "x"}, newlines=True)
    for pieces in (None, list(out), split(out, [1, 3, 9])):
        msg, _ = parse("glm45", [t], out, pieces)
        assert msg["reasoning_content"] == "plan" and msg["content"] is None
        assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "x"}
    msg, _ = parse("glm45", [t], "\n\nHello")  # blank lines before text stay text (one "\n" is layout)
    assert msg["content"] == "\nHello" and msg.get("reasoning_content") is None


def test_leading_whitespace_is_not_rescanned() -> None:
    import time

    p = fmt_of("glm45").parser(ChatRequest(messages=[], tools=[]))
    t0 = time.perf_counter()
    for _ in range(50_000):
        assert p.feed("\n") == []
    assert time.perf_counter() - t0 < 2
    assert [e for e in p.feed("<think>x") if isinstance(e, ReasoningEvent)] == [ReasoningEvent("x")]


# --------------------------------------------------------------------------- required grammar


@lru_cache(maxsize=None)
def _grammar(family: str, tools_json: str, choice: str, parallel: bool, thinking: bool) -> xgr.Grammar:
    tools = [Tool.from_openai(t) for t in json.loads(tools_json)]
    req = ChatRequest(messages=[], tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
                      enable_thinking=thinking)
    c = fmt_of(family).constraint(req)
    assert c is not None and c.grammar
    return xgr.Grammar.from_ebnf(c.grammar)  # as vLLM loads it


def grammar(family: str, tools: list[Tool], choice: str = "required", parallel: bool = True,
            thinking: bool = True) -> xgr.Grammar:
    return _grammar(family, json.dumps([t.raw for t in tools]), choice, parallel, thinking)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("thinking", [True, False])
def test_required_is_calls_only(family: str, thinking: bool) -> None:
    t = tool(obj(n={"type": "integer"}))
    g = grammar(family, [t], thinking=thinking)
    one, two = ("f", {"n": 1}), ("f", {"n": 2})
    assert accepts(g, output(family, [one], thinking))
    assert accepts(g, output(family, [one, two], thinking))
    compact = output(family, [one], thinking) + write_call("f", {"n": 2}, newlines=False)
    assert accepts(g, compact)  # calls run together
    assert accepts(g, output(family, [one], thinking) + "\n" + write_call("f", {"n": 2}, newlines=False))
    for tail in ("hello world", "\nhello", "\n", " "):
        assert not accepts(g, output(family, [one], thinking) + tail), tail
    assert not accepts(g, output(family, [], thinking) + "text" + write_call("f", {"n": 1}, newlines=False))
    single = grammar(family, [t], parallel=False, thinking=thinking)
    assert accepts(single, output(family, [one], thinking))
    assert not accepts(single, output(family, [one, two], thinking))
    assert not accepts(single, output(family, [one], thinking) + "hello")
    auto = grammar(family, [t], choice="auto", thinking=thinking)
    assert accepts(auto, output(family, [one], thinking) + ("\n" if thinking else "") + "hello")


# --------------------------------------------------------------------------- round trip


def _bfcl_tools() -> list[Tool]:
    seen: dict[str, Tool] = {}
    for line in (DATA / "bfcl-sample.jsonl").read_text().splitlines():
        if line.strip():
            for t in json.loads(line)["request"]["tools"]:
                seen.setdefault(json.dumps(t["function"]["parameters"], sort_keys=True), Tool.from_openai(t))
    return list(seen.values())


class Color(str, Enum):
    RED = "red"
    GREEN = "green"


class Level(int, Enum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    # No length limit on a nested string: xgrammar 0.2.8 then allows no JSON escape in it
    # (characters [^"\\\r\n] only), which is stricter than the schema.
    street: str
    zip: Optional[str] = None
    floor: Optional[int] = None


class Item(BaseModel):
    name: str
    qty: int = Field(ge=0)
    tags: list[str] = []
    color: Optional[Color] = None


class Order(BaseModel):
    color: Color
    maybe_color: Optional[Color] = None
    level: Level
    mode: Literal["fast", "slow"]
    mixed: Literal["7", 8, "true", "null"]
    address: Address
    maybe_address: Optional[Address] = None
    items: list[Item] = Field(max_length=3)
    note: Optional[str] = None
    count: Optional[int] = None
    ratio: float
    flag: bool
    id_or_name: Union[int, str]
    payload: Union[dict[str, int], str]
    values: Union[list[int], str]
    text: str
    code: str = Field(min_length=1, max_length=8)


class Mini(BaseModel):
    a: Optional[Level] = None
    b: Union[Color, int] = 1
    c: list[Optional[Address]] = Field(default=[], max_length=2)


def _closed(schema: Any) -> Any:
    """The schema with undeclared properties forbidden wherever it does not say: an XML key
    is a name, and xgrammar's grammar (strict mode) allows no undeclared property."""
    if isinstance(schema, list):
        return [_closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "const", "default", "examples") else _closed(v) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


PYDANTIC = [Tool.from_openai({"type": "function", "function": {"name": m.__name__.lower(),
                                                                 "parameters": _closed(m.model_json_schema())}})
            for m in (Order, Mini)]
BFCL = [Tool.from_openai({**t.raw, "function": {**t.raw["function"], "parameters": _closed(t.parameters)}})
        for t in _bfcl_tools()]
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@lru_cache(maxsize=None)
def _strategy(schema_json: str) -> st.SearchStrategy:
    return from_schema(json.loads(schema_json))


def _ambiguous(value: Any, schema: Any) -> bool:
    """A string whose raw text is also a valid non-string JSON value (``"7"`` for
    ``int | str``): the XML text cannot tell them apart, so it is left out."""
    if not isinstance(value, str):
        return False
    try:
        parsed = json.loads(value, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, RecursionError):
        return False
    return not isinstance(parsed, str) and jsonschema.Draft202012Validator(schema).is_valid(parsed)


def _in_schema_order(value: Any, schema: Any) -> Any:
    """``value`` with every object's keys in its schema's declared order: the grammar keeps
    that order (it is how it enforces ``required``), so that is how the model writes them."""
    if not isinstance(schema, dict):
        return value
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(key, []):
            if jsonschema.Draft202012Validator(branch).is_valid(value):
                return _in_schema_order(value, branch)
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        order = list(schema["properties"])
        items = sorted(value.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        return {k: _in_schema_order(v, schema["properties"].get(k)) for k, v in items}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_in_schema_order(v, schema["items"]) for v in value]
    return value


def _round_trip(family: str, t: Tool, data: st.DataObject, cuts: list[int]) -> None:
    args = data.draw(_strategy(json.dumps(t.parameters)), label="arguments")
    assert isinstance(args, dict)
    resolved = resolve_refs(t.parameters)
    for k, v in args.items():
        assume(NAME.fullmatch(k))
        assume(not (isinstance(v, str) and VALUE_CLOSE in v))
        assume(not _ambiguous(v, resolved["properties"][k]))
    jsonschema.validate(args, t.parameters)  # the generator kept its promise
    args = _in_schema_order(args, resolved)
    out = output(family, [(t.name, args)])
    whole, p = parse(family, [t], out)
    pieces, _ = parse(family, [t], out, split(out, cuts))
    for msg in (whole, pieces):
        assert msg["content"] is None and msg["reasoning_content"] == "r"
        [call] = msg["tool_calls"]
        assert call["function"]["name"] == t.name
        assert exact(json.loads(call["function"]["arguments"])) == exact(args)
    assert p.invalid_calls == [] and not p.incomplete_call
    # and the same text is what the family's constraint lets the model write for this tool
    assert accepts(grammar(family, [t], choice=t.name), out)


def _settings(examples: int) -> settings:
    # Modest counts keep this file well under a minute on 2 cores; 400 each passed locally.
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("family", FAMILIES)
@_settings(60)
@given(data=st.data(), index=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_round_trip_bfcl(family: str, data: st.DataObject, index: int, cuts: list[int]) -> None:
    _round_trip(family, BFCL[index % len(BFCL)], data, cuts)


@pytest.mark.parametrize("family", FAMILIES)
@_settings(30)
@given(data=st.data(), which=st.sampled_from(PYDANTIC), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_round_trip_pydantic(family: str, data: st.DataObject, which: Tool, cuts: list[int]) -> None:
    _round_trip(family, which, data, cuts)


def test_corpus_covers_the_schema_shapes() -> None:
    text = json.dumps([t.parameters for t in PYDANTIC])
    for shape in ('"$defs"', '"$ref"', '"anyOf"', '"enum"', '"const"' if '"const"' in text else '"enum"', '"items"'):
        assert shape in text, shape
    assert len(BFCL) >= 150


# --------------------------------------------------------------------------- real engine


@pytest.mark.e2e
def test_required_ends_after_the_calls_on_a_real_engine(glm45_server) -> None:
    """Parallel calls on (the default): the answer is calls and then the end, so the SDK's
    streaming helper finishes instead of raising LengthFinishReasonError."""
    client = glm45_server.client()
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["北京", "上海"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
    kw = dict(model="tiny-glm45", messages=[{"role": "user", "content": "北京天气？"}], tools=[weather],
              tool_choice="required", max_tokens=400, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert [c.function.arguments for c in final.choices[0].message.tool_calls] == [
        c.function.arguments for c in choice.message.tool_calls]
