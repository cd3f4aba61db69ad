"""Custom (freeform) tools in the formats: the grammar rewrites, the constraint of every family,
the parser's view of the call, and the incremental decoding of the input.

The grammar is Codex's own ``apply_patch`` Lark grammar, recorded from Codex 0.169.0
(tests/data/codex_custom_tool_request.json).  xgrammar's matcher says what a constraint
accepts; the ``lark`` package says what parses.
"""

from __future__ import annotations

import json
from pathlib import Path

import lark
import pytest
import xgrammar as xg
from hypothesis import given, settings
from hypothesis import strategies as st
from xgrammar.testing import _is_grammar_accept_string as accepts

from glmserve.formats import FORMATS, ebnf, freeform, get_format
from glmserve.formats.base import ChatRequest, Tool
from glmserve.formats.message import MessageBuilder
from glmserve.formats.xmlcall import write_call

DATA = Path(__file__).parents[1] / "data"
CODEX = json.loads((DATA / "codex_custom_tool_request.json").read_text())["body"]
APPLY_PATCH = next(t for t in CODEX["tools"] if t["type"] == "custom")
LARK = APPLY_PATCH["format"]["definition"]
MARKER = "</arg_value>"

PATCH = ("*** Begin Patch\n*** Add File: docs/说明.md\n+# 你好，世界\n+He said \"hi\" \\ <b>bold</b>\t</arg_val>\n"
         "*** Update File: src/app.py\n@@ def main():\n-    print('hi')\n+    print('你好')\n*** End Patch\n")
NOT_A_PATCH = "*** Begin Patch\n*** Add File: a.txt\nno plus sign\n*** End Patch\n"
XML = ("glm45", "glm47", "glm51", "glm53")


# The lark package refuses zero-width terminals, so Codex's ``/(.*)/`` is read as the same
# language written ``/(.+)/?``; Earley, as lark parses by default.
LARK_PARSER = lark.Lark(LARK.replace("/(.*)/", "/(.+)/?"), start="start")


def lark_parses(text: str) -> bool:
    try:
        LARK_PARSER.parse(text)
    except lark.exceptions.LarkError:
        return False
    return True


def test_the_samples_are_what_they_claim() -> None:
    assert lark_parses(PATCH) and not lark_parses(NOT_A_PATCH)
    assert lark_parses(PATCH.replace("</arg_val>", MARKER))  # Lark allows the marker; the XML families cannot carry it


# --------------------------------------------------------------------------- the EBNF rewrites


def text_grammar() -> ebnf.Grammar:
    return ebnf.parse(freeform.text_grammar("lark", LARK))


def test_parse_and_print_keep_the_language() -> None:
    printed = xg.Grammar.from_ebnf(str(text_grammar()))
    assert accepts(printed, PATCH) and not accepts(printed, NOT_A_PATCH)
    assert not accepts(printed, PATCH[:-5])


def test_avoiding_the_marker_keeps_every_other_text() -> None:
    g = xg.Grammar.from_ebnf(str(ebnf.avoiding(text_grammar(), MARKER)))
    assert accepts(g, PATCH)
    assert not accepts(g, PATCH.replace("</arg_val>", MARKER))  # the one thing taken away
    assert not accepts(g, NOT_A_PATCH)
    # prefixes and near misses of the marker stay: a patch may hold HTML, "</arg_value" ...
    for near in ("</arg_value", "<</arg_value", "</arg_value >", "</arg_valu>", "<<>>", "</a>"):
        assert accepts(g, PATCH.replace("</arg_val>", near)), near


@st.composite
def marker_texts(draw: st.DrawFn) -> str:
    return draw(st.text(alphabet="<ab>x\n", max_size=14))


SMALL = "<ab>"
REGEXES = [r"[^\n]*", r"(<|a|b|>|x)*", r"<a?b?>+x?", r"[<>ab]*\n[ab<>x]+", r"(x|<ab)*>?"]


@pytest.mark.parametrize("regex", REGEXES)
@settings(max_examples=80, deadline=None)
@given(text=marker_texts())
def test_avoiding_is_the_grammar_without_the_marker(regex: str, text: str) -> None:
    plain = _grammar(freeform.text_grammar("regex", regex))
    avoid = _grammar(str(ebnf.avoiding(ebnf.parse(freeform.text_grammar("regex", regex)), SMALL)))
    assert accepts(avoid, text) == (accepts(plain, text) and SMALL not in text)


def test_a_grammar_that_always_holds_the_marker_is_refused() -> None:
    with pytest.raises(ebnf.Unsupported, match="marker"):
        ebnf.avoiding(ebnf.parse(freeform.text_grammar("regex", "x</arg_value>y")), MARKER)
    with pytest.raises(freeform.GrammarError, match="before </arg_value>"):
        freeform.raw_grammar("regex", "x</arg_value>y", MARKER)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from('a"\\\n\t\r\x01\x1f\x7f/中😀 '), max_size=12))
def test_json_escaping_accepts_exactly_the_escaped_texts(text: str) -> None:
    plain = _grammar(freeform.text_grammar("regex", r"[^\x02]*"))
    escaped = _grammar(freeform.json_grammar("regex", r"[^\x02]*"))
    assert accepts(plain, text)
    body = json.dumps(text, ensure_ascii=False)[1:-1]
    assert accepts(escaped, body)
    # read as a string body itself, the text is accepted exactly when it is one, written as GLM writes
    assert accepts(escaped, text) == (_canonical_body(text) == text)


def _canonical_body(text: str) -> str | None:
    try:
        return json.dumps(json.loads('"' + text + '"'), ensure_ascii=False)[1:-1]
    except ValueError:
        return None


def test_json_escaping_of_the_patch_grammar() -> None:
    g = _grammar(freeform.json_grammar("lark", LARK))
    assert accepts(g, json.dumps(PATCH, ensure_ascii=False)[1:-1])
    assert not accepts(g, json.dumps(NOT_A_PATCH, ensure_ascii=False)[1:-1])
    assert not accepts(g, PATCH)


def test_case_insensitive_terminals_are_refused_where_a_rewrite_is_needed() -> None:
    definition = 'start: WORD\nWORD: /[a-z]+/i\n'
    freeform.check("lark", definition)  # xgrammar reads it ...
    with pytest.raises(freeform.GrammarError, match="JSON string"):
        freeform.json_grammar("lark", definition)  # ... but nothing can escape an opaque Regex(...)


def test_unreadable_grammars_say_why() -> None:
    with pytest.raises(freeform.GrammarError, match="cannot read this lark grammar"):
        freeform.check("lark", "start: undefined_rule\n")
    with pytest.raises(freeform.GrammarError, match="regex"):
        freeform.check("regex", "(unclosed")


def _grammar(text: str) -> xg.Grammar:
    return xg.Grammar.from_ebnf(text)


# --------------------------------------------------------------------------- the families


def custom_tool(definition: str = LARK, syntax: str = "lark") -> Tool:
    return Tool.from_openai({"type": "custom", "custom": {"name": "apply_patch", "description": APPLY_PATCH["description"],
                                                          "format": {"type": "grammar", "grammar": {
                                                              "syntax": syntax, "definition": definition}}}})


SHELL = Tool.from_openai({"type": "function", "function": {"name": "exec_command", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}})


def model_call(family: str, text: str) -> str:
    """The custom call as the family's model writes it (after any reasoning)."""
    if family in XML:
        return write_call("apply_patch", {"input": text}, newlines=family == "glm45")
    body = json.dumps({"input": text}, ensure_ascii=False)
    if family == "chatml":
        return '<tool_call>\n{"name": "apply_patch", "arguments": ' + body + "}\n</tool_call>"
    return "apply_patch\n" + body


def lead(family: str) -> str:
    """What comes before the call with thinking off (GLM-5.3 and GLM-Z1 always think)."""
    return {"glm53": "</think>", "glmz1": "ok</think>", "glm45": "\n"}.get(family, "")


@pytest.mark.parametrize("family", sorted(FORMATS))
@pytest.mark.parametrize("choice", ["apply_patch", "required", "auto"])
def test_every_family_holds_the_input_to_the_grammar(family: str, choice: str) -> None:
    fmt = get_format(family)
    req = ChatRequest(messages=[{"role": "user", "content": "edit"}], tools=[SHELL, custom_tool()], tool_choice=choice,
                      enable_thinking=False)
    g = _grammar(fmt.constraint(req).grammar)
    assert accepts(g, lead(family) + model_call(family, PATCH))
    if (family, choice) != ("glmz1", "auto"):  # GLM-Z1's auto answer may be any text (it has no text marker)
        assert not accepts(g, lead(family) + model_call(family, NOT_A_PATCH))
    if family in XML:  # the raw value cannot hold the marker that would end it
        assert not accepts(g, lead(family) + model_call(family, PATCH.replace("</arg_val>", MARKER)))
    # the family's parser hands the input back exactly
    parser = fmt.parser(req)
    built = MessageBuilder()
    built.add(parser.feed(lead(family) + model_call(family, PATCH)))
    built.add(parser.finish())
    assert [(c.name, freeform.input_of(c.arguments)) for c in built.calls] == [("apply_patch", PATCH)]


def test_free_text_custom_tools_are_plain_string_arguments() -> None:
    tool = Tool.from_openai({"type": "custom", "custom": {"name": "note"}})
    assert tool.freeform == ("text", "")
    fmt = get_format("glm47")
    req = ChatRequest(messages=[{"role": "user", "content": "x"}], tools=[tool], tool_choice="note",
                      enable_thinking=False)
    g = _grammar(fmt.constraint(req).grammar)
    assert accepts(g, write_call("note", {"input": "任何 text\n<b>"}, newlines=False))


def test_the_whitespace_bound_of_the_xml_families_leaves_the_grammar_alone() -> None:
    """GLM-4.5/4.7 bound whitespace runs of their call layout to two characters by rewriting
    ``[ \\n\\r\\t]*`` in the EBNF; a custom grammar's own whitespace keeps its meaning."""
    tool = custom_tool('start: "a" /[ \\n\\r\\t]*/ "b"\n')
    req = ChatRequest(messages=[{"role": "user", "content": "x"}], tools=[tool], tool_choice="apply_patch",
                      enable_thinking=False)
    g = _grammar(get_format("glm47").constraint(req).grammar)
    assert accepts(g, model_call("glm47", "a \n\t \n b"))


def test_what_the_model_sees() -> None:
    """A function with one string argument whose description carries the grammar, in the
    family's tool list; a history call is written with that argument, raw."""
    req = ChatRequest(messages=[
        {"role": "user", "content": "edit"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "apply_patch",
                                                          "arguments": json.dumps({"input": PATCH})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Done!"}], tools=[custom_tool()])
    prompt = get_format("glm47").render(req).text
    listed = json.loads(next(line for line in prompt.splitlines() if '"apply_patch"' in line))
    fn = listed["function"]
    assert fn["name"] == "apply_patch" and fn["description"] == APPLY_PATCH["description"]
    assert fn["parameters"]["required"] == ["input"]
    assert LARK in fn["parameters"]["properties"]["input"]["description"]
    assert write_call("apply_patch", {"input": PATCH}, newlines=False) in prompt


# --------------------------------------------------------------------------- the input, streamed


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40), cuts=st.lists(st.integers(0, 200), max_size=6), ascii_=st.booleans())
def test_the_decoder_takes_any_split(text: str, cuts: list[int], ascii_: bool) -> None:
    args = json.dumps({"input": text}, ensure_ascii=ascii_)  # ensure_ascii: \uXXXX escapes, surrogate pairs too
    points = sorted({min(c, len(args)) for c in cuts})
    pieces = [args[a:b] for a, b in zip([0, *points], [*points, len(args)])]
    dec = freeform.InputDecoder()
    assert "".join(dec.feed(p) for p in pieces) == text
    assert dec.closed and freeform.input_of(args) == text


def test_input_of_a_cut_call_and_of_odd_arguments() -> None:
    assert freeform.input_of('{"input": "*** Begin Pa') == "*** Begin Pa"
    assert freeform.input_of('{"input": "a\\') == "a"
    assert freeform.input_of('{"other": 1, "input": "x"}') == "x"  # not streamed, still found whole
    assert freeform.input_of('{"input": 5}') == "5"
    assert freeform.input_of("not json") == "not json"
    dec = freeform.InputDecoder()
    assert dec.feed('{"other": "x"}') == "" and not dec.found
