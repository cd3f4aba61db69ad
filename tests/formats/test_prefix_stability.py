"""Prompt token prefixes stay stable across agent turns, so vLLM's prefix cache hits.

An agent resends the whole conversation each turn, appending the assistant's tool call and the
tool's result.  If rendering or tokenizing changed any earlier token, turn N+1 would prefill
everything again.  The ids are computed exactly as the server does (the family's renderer, then
``PromptTokenizer`` on the tiny model's real tokenizer), without starting vLLM.

Precisely: turn N's prompt ids minus its generation-prompt suffix (``<|assistant|>``,
``<|assistant|><think>``, ...) are a prefix of turn N+1's ids.  The only break is the official
templates' own: GLM-4.5 always, and GLM-4.7 / GLM-5.1 by default (``clear_thinking``), drop the
reasoning of assistant turns before the last user message, so a *new user message* after a
reasoning tool loop re-renders that loop; the test pins that boundary.
"""

from __future__ import annotations

import json
from functools import cache

import pytest

from glmserve.engine.tokenize import PromptTokenizer
from glmserve.formats import FORMATS, get_format
from glmserve.formats.base import ChatRequest, Tool

# family -> tiny model whose tokenizer it runs with (None: the embedded default, ChatML)
TOKENIZER_OF = {
    "chatml": None, "glm4": "glm4", "glm4-0414": "glm4-0414", "glmz1": "glm4",
    "glm45": "glm45", "glm47": "glm45", "glm51": "glm51", "glm53": "glm53",
}
# families whose official template drops reasoning before the last user message (by default)
DROPS_OLD_REASONING = {"glm45", "glm47", "glm51"}

TOOLS = [
    Tool.from_openai({"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
                       "required": ["path"]}}}),
    Tool.from_openai({"type": "function", "function": {
        "name": "bash", "description": "Run a shell command.",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}),
]


def test_every_family_is_covered() -> None:
    assert set(TOKENIZER_OF) == set(FORMATS)


@cache
def tokenizer(family: str) -> PromptTokenizer:
    from transformers import AutoTokenizer

    from glmserve.models import default_model_dir
    from tiny_models import build_tiny

    kind = TOKENIZER_OF[family]
    d = default_model_dir() if kind is None else build_tiny(kind)
    return PromptTokenizer(AutoTokenizer.from_pretrained(str(d)))


def agent_messages(rounds: int, reasoning: bool) -> list[dict]:
    """System + user, then ``rounds`` x (assistant tool call, tool result)."""
    msgs: list[dict] = [
        {"role": "system", "content": "You are a coding agent. Use the tools."},
        {"role": "user", "content": "Fix the failing test in tests/test_main.py"},
    ]
    for i in range(rounds):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "read_file" if i % 2 == 0 else "bash",
                             "arguments": json.dumps({"path": f"src/f{i}.py"} if i % 2 == 0 else {"command": f"pytest -k t{i}"})}}
        a: dict = {"role": "assistant", "content": "", "tool_calls": [call]}
        if reasoning:
            a["reasoning_content"] = f"I need to look at step {i} first."
        msgs += [a, {"role": "tool", "tool_call_id": f"call_{i}", "content": f"result {i}: def f{i}(): return {i}\n"}]
    return msgs


def ids(family: str, messages: list[dict], gen: bool = True, **kw) -> list[int]:
    req = ChatRequest(messages=messages, tools=TOOLS, add_generation_prompt=gen, **kw)
    return tokenizer(family).encode_parts(get_format(family).render(req).parts)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("reasoning", [False, True], ids=["plain", "reasoning"])
@pytest.mark.parametrize("thinking", [True, False], ids=["think", "nothink"])
@pytest.mark.parametrize("family", list(TOKENIZER_OF))
def test_agent_turns_extend_the_previous_prompt(family: str, thinking: bool, reasoning: bool) -> None:
    for n in range(3):  # turns 1-2, 2-3, 3-4
        full = ids(family, agent_messages(n, reasoning), enable_thinking=thinking)
        base = ids(family, agent_messages(n, reasoning), gen=False, enable_thinking=thinking)
        nxt = ids(family, agent_messages(n + 1, reasoning), enable_thinking=thinking)
        # the generation prompt is a short suffix of the turn's own prompt (glmz1 spells <think> as text
        # on the glm4 tokenizer, which lacks it) ...
        assert full[: len(base)] == base
        assert 1 <= len(full) - len(base) <= 8, tokenizer(family).hf.decode(full[len(base):])
        # ... and everything before it is kept by the next turn
        assert nxt[: len(base)] == base, (
            f"turn {n + 2} changes token {common_prefix(base, nxt)} of {len(base)}: "
            f"{tokenizer(family).hf.decode(base[common_prefix(base, nxt):][:20])!r}"
        )
        assert len(nxt) > len(full)


@pytest.mark.parametrize("family", list(TOKENIZER_OF))
def test_new_user_message_after_a_reasoning_loop(family: str) -> None:
    """A new user message keeps the prefix, except where the official template clears old
    reasoning: there the first change is the first assistant turn after the previous user message."""
    loop = agent_messages(2, reasoning=True) + [{"role": "assistant", "content": "Fixed.", "reasoning_content": "Tests pass."}]
    base = ids(family, loop[:-1], gen=False)
    after_msgs = loop + [{"role": "user", "content": "Thanks. Now run the linter."}]
    after = ids(family, after_msgs)
    cut = common_prefix(base, after)
    if family not in DROPS_OLD_REASONING:
        assert cut == len(base), tokenizer(family).hf.decode(base[cut:][:20])
        return
    # everything up to the previous user message (and its assistant header) is kept ...
    up_to_user = ids(family, loop[:2], gen=False)
    assert len(up_to_user) <= cut
    # ... and the break is inside the first assistant turn of that loop, where the reasoning was
    first_turn = ids(family, loop[:3], gen=False)
    assert cut < len(first_turn)
    assert "I need to look at step 0" in tokenizer(family).hf.decode(base[cut:])
    # with clear_thinking false (GLM-4.7 / 5.1 honour it; GLM-4.5's template has no switch) it is kept
    if family != "glm45":
        kept = ids(family, loop[:-1], gen=False, clear_thinking=False)
        assert common_prefix(kept, ids(family, after_msgs, clear_thinking=False)) == len(kept)


def test_segment_cache_gives_the_same_ids():
    """The tokenizer's segment cache (long system prompts and tool blocks resent every turn) returns
    exactly what tokenizing afresh does, and is used on the next turn."""
    from glmserve.engine.tokenize import PromptTokenizer

    hf = tokenizer("glm45").hf
    cached, fresh = PromptTokenizer(hf), PromptTokenizer(hf, cache_tokens=0)
    fmt = get_format("glm45")
    long_system = {"role": "system", "content": "Rules: read before you edit. " * 200 + "<think> is text here."}
    for n in range(3):
        req = ChatRequest(messages=[long_system] + agent_messages(n, reasoning=True)[1:], tools=TOOLS)
        parts = fmt.render(req).parts
        assert cached.encode_parts(parts) == fresh.encode_parts(parts)
    assert cached.cache_hits >= 4 and fresh.cache_hits == 0
