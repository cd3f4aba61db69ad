"""Calls cut by the token limit, in every family, at every character.

Each family's output (a text preamble, then one or two calls in the family's own layout) is cut
at every prefix length and finished as the token limit ends it (``finish(cut=True)``).  For
every cut: the answer fed whole, fed character by character and fed in random chunks folds to
the same message; its text and reasoning are prefixes of the uncut answer's (so no marker or
partial name ever shows as text); its calls are the uncut answer's calls as far as they got
(same names, argument text a prefix of the final one and a JSON prefix, all but the last
complete); a call cut mid-way is flagged (``incomplete_call``) and every cut inside a call
(after its opener) is flagged, whether or not its name was complete.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pydantic_core
import pytest

from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, Event, Tool
from glmserve.formats.chatml import CALL_END, call_begin
from glmserve.formats.jsoncall import ASSISTANT
from glmserve.formats.message import MessageBuilder, merge_events
from glmserve.formats.xmlcall import write_call

from tool_sets import CHAT_TOOLS

TOOLS = [Tool.from_openai(t) for t in CHAT_TOOLS] + [Tool(name="python", raw={"type": "function",
                                                                              "function": {"name": "python"}})]
CALLS = [("get_weather", {"city": "北京 <b>", "days": 3}), ("search", {"q": 'a "b" </c'})]
PREAMBLE = "Let me check 天气."
REASONING = "I think <x>."


@dataclass
class Case:
    family: str
    thinking: bool
    output: str
    regions: list[tuple[int, int]]
    """Per call: from just after its opener (the first character of the name for the JSON
    families) to where the parser can know it complete."""
    reasoning: str = ""
    content: str = PREAMBLE
    """The uncut answer's text."""


def _xml_case(family: str, calls: list, newlines: bool, lead: str, thinking: bool = True) -> Case:
    out = lead
    regions = []
    for name, args in calls:
        out += "\n" if newlines else ""
        start = len(out) + len("<tool_call>")
        out += write_call(name, args, newlines=newlines)
        regions.append((start, len(out)))
    return Case(family, thinking, out, regions, REASONING if thinking else "")


def _json_case(family: str, calls: list, lead: str) -> Case:
    out = lead
    regions = []
    for name, args in calls:
        out += ASSISTANT
        start = len(out) + 1
        out += name + "\n" + json.dumps(args, ensure_ascii=False)
        regions.append((start, len(out)))
    return Case(family, family == "glmz1", out, regions, REASONING if family == "glmz1" else "")


def _chatml_case(calls: list) -> Case:
    out = PREAMBLE
    regions = []
    for name, args in calls:
        out += "\n"
        start = len(out) + len("<tool_call>")
        out += call_begin(name) + json.dumps(args, ensure_ascii=False)
        done = len(out) + 1  # the outer object's "}" completes the call
        out += CALL_END
        regions.append((start, done))
    return Case("chatml", False, out, regions, content=PREAMBLE + "\n" if calls else PREAMBLE)


def cases() -> list[Case]:
    out = []
    for calls in (CALLS[:1], CALLS):
        out += [
            _json_case("glm4", calls, "\n" + PREAMBLE),
            _json_case("glm4-0414", calls, "\n" + PREAMBLE),
            _json_case("glmz1", calls, REASONING + "</think>\n" + PREAMBLE),
            _xml_case("glm45", calls, True, "\n<think>" + REASONING + "</think>\n" + PREAMBLE),
            _xml_case("glm45", calls, True, "\n" + PREAMBLE, thinking=False),
            _xml_case("glm47", calls, False, REASONING + "</think>" + PREAMBLE),
            _xml_case("glm47", calls, False, PREAMBLE, thinking=False),
            _xml_case("glm51", calls, False, REASONING + "</think>" + PREAMBLE),
            _xml_case("glm53", calls, False, REASONING + "</think>" + PREAMBLE),
            _chatml_case(calls),
        ]
    # a GLM-4 built-in tool's raw body, cut like any call
    body = "\n" + PREAMBLE + ASSISTANT
    out.append(Case("glm4", True, body + "python\nprint('<|a')", [(len(body) + 1, 10**9)]))
    return out


CASES = cases()


def parse(case: Case, pieces: list[str], cut: bool) -> tuple[list[Event], dict, bool, list[bool]]:
    fmt = get_format(case.family)
    parser = fmt.parser(ChatRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                    enable_thinking=case.thinking))
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish(cut=cut)
    b = MessageBuilder()
    b.add(events)
    msg = b.message()
    for call in msg.get("tool_calls", []):
        call.pop("id")
    return merge_events(events), msg, parser.incomplete_call, [c.complete for c in b.calls]


def random_pieces(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 9)
        out.append(text[i:i + k])
        i += k
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}-{'think' if c.thinking else 'plain'}-{len(c.regions)}"
                                             f"-{i}" for i, c in enumerate(CASES)])
def test_cut_at_every_character(case: Case) -> None:
    _, full, inc, complete = parse(case, [case.output], cut=False)
    assert not inc and all(complete) and len(complete) == len(case.regions)
    assert full["content"] == case.content and full.get("reasoning_content", "") == case.reasoning
    full_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in full["tool_calls"]]
    rng = random.Random(len(case.output))
    for n in range(len(case.output) + 1):
        text = case.output[:n]
        events, msg, inc, complete = parse(case, [text], cut=True)
        for pieces in (list(text), random_pieces(text, rng), random_pieces(text, rng)):
            assert parse(case, pieces, cut=True) == (events, msg, inc, complete), (n, text, pieces)
        where = f"cut at {n}: {text[-30:]!r}"
        assert case.content.startswith(msg["content"] or ""), where
        assert case.reasoning.startswith(msg.get("reasoning_content", "")), where
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]
        assert len(calls) <= len(full_calls) and all(complete[:-1]), where
        for k, ((name, args), (full_name, full_args)) in enumerate(zip(calls, full_calls)):
            assert name == full_name and full_args.startswith(args), where
            if complete[k]:
                assert args == full_args, where
            elif args:
                pydantic_core.from_json(args, allow_partial=True)  # a JSON prefix
        if complete and not complete[-1]:
            assert inc, where
        inside = [k for k, (a, b) in enumerate(case.regions) if a <= n < b]
        if inside:
            assert inc, where
            assert len(calls) <= inside[0] + 1 and all(complete[:inside[0]]) and len(complete) >= inside[0], where
        else:
            assert all(complete), where
            assert len(calls) == sum(1 for _, b in case.regions if b <= n), where


def test_cut_is_the_only_difference() -> None:
    """A natural end keeps what a cut drops: a half-written opener and a partial name are text."""
    _, msg, inc, _ = parse(_xml_case("glm47", [], False, PREAMBLE, thinking=False),
                           [PREAMBLE + "<tool_call>get_w"], cut=False)
    assert msg["content"] == PREAMBLE + "<tool_call>get_w" and not inc
    _, msg, inc, _ = parse(_xml_case("glm47", [], False, PREAMBLE, thinking=False),
                           [PREAMBLE + "<tool_call>get_w"], cut=True)
    assert msg["content"] == PREAMBLE and inc
    _, msg, inc, _ = parse(_chatml_case([]), [PREAMBLE + "\n<tool_"], cut=False)
    assert msg["content"] == PREAMBLE + "\n<tool_"
    _, msg, _, _ = parse(_json_case("glm4", [], ""), ["\nget_w"], cut=False)
    assert msg["content"] == "get_w"
    _, msg, inc, _ = parse(_json_case("glm4", [], ""), ["\nget_w"], cut=True)
    assert msg["content"] is None and inc
