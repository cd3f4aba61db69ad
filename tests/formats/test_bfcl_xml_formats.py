"""BFCL sample against the XML formats (glm45, glm47, glm51, glm53): exact prompts, call round
trips (streamed one character at a time and whole), and constraint acceptance.

GLM-5.1 / 5.3 have no stored BFCL prompts: theirs are compared with the official templates
rendered by transformers (their constraint is glm47's, see test_format_glm5)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string as accepts

from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, Tool, ToolCallArgs
from glmserve.formats.message import MessageBuilder
from glmserve.formats.grammar import clear_caches
from glmserve.formats.xmlcall import is_string_schema, property_schema, render_value, write_call

DATA = Path(__file__).parents[1] / "data" / "bfcl"
FAMILIES = {"glm45": "glm4.5/4.6", "glm47": "glm4.7"}
CASES = [json.loads(line) for line in (DATA / "bfcl-sample.jsonl").read_text().splitlines() if line.strip()]
PROMPTS = {
    (row["family"], row["id"]): row["expected_prompt"]
    for row in map(json.loads, (DATA / "bfcl-prompts.jsonl").read_text().splitlines())
}
IDS = [c["id"] for c in CASES]
GLM5 = {"glm51": "GLM-5.1", "glm53": "GLM-5.3-Flash"}
TEMPLATES = Path(__file__).parents[1] / "data" / "templates"


def chat_request(case: dict[str, Any], **kw: Any) -> ChatRequest:
    r = case["request"]
    return ChatRequest(messages=r["messages"], tools=[Tool.from_openai(t) for t in r["tools"]], **kw)


def model_output(fmt: str, case: dict[str, Any]) -> str:
    """The case's ground-truth calls as the model would write them, after reasoning."""
    newlines = fmt == "glm45"
    calls = "".join(("\n" if newlines else "") + write_call(n, a, newlines=newlines) for n, a in case["calls"])
    return ("\n<think>Let me work out the calls.</think>" if newlines else "Let me work out the calls.</think>") + calls


def expected_arguments(tools: dict[str, Tool], name: str, args: dict[str, Any]) -> dict[str, Any]:
    """What parsing must give back: a value valid for its parameter comes back as it is; an
    invalid one as the written text when that string is valid (a number for a string), else
    as the text's JSON reading (a ``true`` outside a string enum stays ``true``)."""

    def valid(value: Any, schema: Any) -> bool:
        return schema is None or jsonschema.Draft202012Validator(schema).is_valid(value)

    def expected(v: Any, schema: Any) -> Any:
        text = render_value(v)
        if valid(v, schema):
            return text if is_string_schema(schema) else v
        if valid(text, schema):
            return text
        try:
            return json.loads(text)
        except ValueError:
            return text

    return {k: expected(v, property_schema(tools[name], k)) for k, v in args.items()}


@pytest.mark.parametrize("fmt", list(FAMILIES))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfcl_prompt(fmt: str, case: dict[str, Any]) -> None:
    assert get_format(fmt).render(chat_request(case)).text == PROMPTS[(FAMILIES[fmt], case["id"])]


@pytest.mark.parametrize("fmt", list(GLM5))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfcl_prompt_glm5(fmt: str, case: dict[str, Any]) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    r = case["request"]
    (want,), _ = render_jinja_template([r["messages"]], tools=r["tools"], add_generation_prompt=True,
                                       chat_template=(TEMPLATES / f"{GLM5[fmt]}.jinja").read_text(encoding="utf-8"))
    assert get_format(fmt).render(chat_request(case)).text == want


@pytest.mark.parametrize("fmt", [*FAMILIES, *GLM5])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfcl_round_trip(fmt: str, case: dict[str, Any]) -> None:
    f = get_format(fmt)
    req = chat_request(case)
    tools = {t.name: t for t in req.tools}
    out = model_output(fmt, case)
    want = [(n, expected_arguments(tools, n, a)) for n, a in case["calls"]]
    for streamed in (False, True):
        p = f.parser(req)
        events = [e for ch in (list(out) if streamed else [out]) for e in p.feed(ch)] + p.finish()
        b = MessageBuilder()
        b.add(events)
        msg = b.message()
        assert not p.incomplete_call
        assert msg["content"] is None
        assert msg["reasoning_content"] == "Let me work out the calls."
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]]
        assert got == want
        for i, c in enumerate(msg["tool_calls"]):
            assert "".join(e.delta for e in events if isinstance(e, ToolCallArgs) and e.index == i) == c["function"]["arguments"]


def _schema_valid(case: dict[str, Any], name: str, args: dict[str, Any]) -> bool:
    tool = next(t for t in case["request"]["tools"] if t["function"]["name"] == name)
    try:
        jsonschema.validate(args, tool["function"]["parameters"])
    except jsonschema.ValidationError:
        return False
    return True


VALID = [c for c in CASES if all(_schema_valid(c, n, a) for n, a in c["calls"])]


def test_most_ground_truth_is_schema_valid() -> None:
    # A few BFCL answers break their own schema ("Any" outside an enum, a bool for a
    # string enum...); the constraint rightly rejects those, so they are skipped below.
    assert len(VALID) >= 90


@pytest.mark.parametrize("fmt", list(FAMILIES))
@pytest.mark.parametrize("case", VALID, ids=[c["id"] for c in VALID])
def test_bfcl_constraint_accepts_ground_truth(fmt: str, case: dict[str, Any]) -> None:
    f = get_format(fmt)
    out = model_output(fmt, case)
    choices = ["auto", "required"] + ([case["calls"][0][0]] if len(case["calls"]) == 1 else [])
    for choice in choices:
        c = f.constraint(chat_request(case, tool_choice=choice))
        assert c is not None and c.grammar
        assert accepts(xgr.Grammar.from_ebnf(c.grammar), out), choice
    single = xgr.Grammar.from_ebnf(f.constraint(chat_request(case, parallel_tool_calls=False)).grammar)
    assert accepts(single, out) == (len(case["calls"]) == 1)


def test_constraint_build_time(capsys: pytest.CaptureFixture[str]) -> None:
    """Cold vs cached constraint build for the largest BFCL tool set (reported, loosely bounded)."""
    case = max(CASES, key=lambda c: len(json.dumps(c["request"]["tools"])))
    report = []
    for fmt in FAMILIES:
        f = get_format(fmt)
        req = chat_request(case, tool_choice="required")
        clear_caches()
        t0 = time.perf_counter()
        tag = f.constraint(req).grammar
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(100):
            assert f.constraint(req).grammar == tag
        cached = (time.perf_counter() - t0) / 100
        t0 = time.perf_counter()
        xgr.Grammar.from_ebnf(tag)
        compile_s = time.perf_counter() - t0
        report.append(f"{fmt}: {len(req.tools)} tools cold={cold * 1e3:.2f}ms cached={cached * 1e6:.1f}us "
                      f"(xgrammar Grammar.from_ebnf {compile_s * 1e3:.2f}ms)")
        assert cached < cold and cold < 2.0
    with capsys.disabled():
        print("\n" + "\n".join(report))
