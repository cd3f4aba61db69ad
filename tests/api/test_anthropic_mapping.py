"""Anthropic Messages request mapping and response shaping, as pure functions.

The Claude Code requests in tests/data/claude-code/ were captured from
``@anthropic-ai/claude-code`` 2.1.328 (``claude -p``) against a capture server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from glmserve.api.anthropic.mapping import (
    select_tools,
    system_text,
    thinking_options,
    to_openai_messages,
    tool_choice,
)
from glmserve.api.anthropic.schemas import CountTokensRequest, MessagesRequest
from glmserve.api.anthropic.shape import BlockFolder, ThinkingSigner, error_body, stop_reason
from glmserve.api.errors import APIError
from glmserve.api.media import MediaNotes
from glmserve.formats.base import ReasoningEvent, TextEvent, ToolCallArgs, ToolCallEnd, ToolCallStart
from glmserve.server_secret import ServerSecret

DATA = Path(__file__).parents[1] / "data" / "claude-code"
SIGNER = ThinkingSigner(ServerSecret.generate())


def claude_code_request(n: int) -> dict:
    return json.loads((DATA / f"request-{n}.json").read_text())


def req(**kw) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **kw}
    return MessagesRequest.model_validate(body)


# --------------------------------------------------------------------------- Claude Code


def test_claude_code_first_request_maps() -> None:
    cap = claude_code_request(1)
    assert cap["path"] == "/v1/messages?beta=true"
    r = MessagesRequest.model_validate(cap["body"])
    assert r.stream and r.max_tokens == 32000
    msgs = to_openai_messages(r.system, r.messages)
    roles = [m["role"] for m in msgs]
    # top-level system, the user turn (text blocks joined), then Claude Code's trailing system message
    assert roles == ["system", "user", "system"]
    assert "You are a Claude agent" in msgs[0]["content"]
    assert msgs[1]["content"].endswith("write hello.txt")
    sel = select_tools(r.tools)
    assert "Write" in [d[1]["function"]["name"] for d in sel.defs]
    assert sel.deferred == ["DeferredToolPlaceholder"] and sel.unsupported == []
    th = thinking_options(r)
    assert th.enable is True and th.omit is True and th.budget is None
    assert r.output_config is not None and r.output_config.effort == "high"


def test_claude_code_tool_result_turn_maps() -> None:
    r = MessagesRequest.model_validate(claude_code_request(2)["body"])
    msgs = to_openai_messages(r.system, r.messages)
    call = next(m for m in msgs if m.get("tool_calls"))
    tool = next(m for m in msgs if m["role"] == "tool")
    assert call["tool_calls"][0]["function"]["name"] == "Write"
    assert json.loads(call["tool_calls"][0]["function"]["arguments"])["content"] == "hello from glm\n"
    assert tool["tool_call_id"] == call["tool_calls"][0]["id"] and tool["name"] == "Write"
    assert tool["content"].startswith("File created successfully")


# --------------------------------------------------------------------------- messages


def test_blocks_to_messages() -> None:
    r = req(system=[{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "b"}],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "let me see", "signature": SIGNER.sign("let me see")},
                    {"type": "redacted_thinking", "data": "zzz"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "北京"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                     "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "data"}]},
                    {"type": "text", "text": "and?"},
                ]},
            ])
    msgs = to_openai_messages(r.system, r.messages, SIGNER)
    assert msgs[0] == {"role": "system", "content": "a\nb"}
    assert msgs[1] == {"role": "user", "content": "weather?"}
    a = msgs[2]
    assert a["content"] == "Checking." and a["reasoning_content"] == "let me see"
    assert [json.loads(c["function"]["arguments"]) for c in a["tool_calls"]] == [{"city": "北京"}, {"city": "Paris"}]
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny", "name": "get"}
    assert msgs[4]["content"] == "no\ndata"
    assert msgs[5] == {"role": "user", "content": "and?"}


def test_system_text() -> None:
    assert system_text(None) is None
    assert system_text("s") == "s"


@pytest.mark.parametrize("content", [
    [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}],
    [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}],
])
def test_images_become_notes_or_are_refused(content: list) -> None:
    r = req(messages=[{"role": "user", "content": content}])
    notes = MediaNotes()
    msgs = to_openai_messages(r.system, r.messages, media=notes)
    assert "image was attached here (image/png, 3 bytes)" in msgs[-1]["content"] and "cannot see it" in msgs[-1]["content"]
    assert [(a.kind, a.media_type, a.size) for a in notes.replaced] == [("image", "image/png", 3)]
    with pytest.raises(APIError) as exc:
        to_openai_messages(r.system, r.messages, media=MediaNotes("reject"))
    assert exc.value.status == 400 and "text only" in exc.value.message


def test_misplaced_blocks_are_refused() -> None:
    r = req(messages=[{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}])
    with pytest.raises(APIError):
        to_openai_messages(r.system, r.messages)
    r = req(messages=[{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}])
    with pytest.raises(APIError):
        to_openai_messages(r.system, r.messages)


@pytest.mark.parametrize("body", [
    {"max_tokens": 0},
    {"messages": []},
    {"messages": [{"role": "user", "content": [{"type": "bogus"}]}]},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"temperature": 1.5},
    {"tools": [{"name": "x"}]},
    {"tools": [{"description": "no name", "input_schema": {}}]},
    {"tool_choice": {"type": "tool"}},
    {"thinking": {"type": "enabled"}},
    {"stop_sequences": [""]},
])
def test_invalid_bodies(body: dict) -> None:
    with pytest.raises(ValidationError):
        req(**body)


def test_missing_max_tokens_only_for_create() -> None:
    with pytest.raises(ValidationError):
        MessagesRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    CountTokensRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})


# --------------------------------------------------------------------------- tools and switches


def test_select_tools() -> None:
    tools = [
        {"name": "a", "input_schema": {"type": "object"}, "description": "A", "cache_control": {"type": "ephemeral"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "custom", "name": "b", "input_schema": {"type": "object"}},
        {"name": "c", "input_schema": {"type": "object"}, "defer_loading": True},
    ]
    sel = select_tools(tools)
    assert [d[0] for d in sel.defs] == ["tools[0]", "tools[2]", "tools[3]"]
    assert sel.defs[0][1] == {"type": "function", "function": {"name": "a", "description": "A",
                                                               "parameters": {"type": "object"}}}
    # a deferred tool is declared, marked deferred (callable once a tool_reference names it)
    assert sel.defs[2][1]["function"] == {"name": "c", "parameters": {"type": "object"}, "defer_loading": True}
    assert sel.unsupported == ["web_search"] and sel.deferred == ["c"]
    forced = select_tools(tools, forced="c")
    assert [d[1]["function"]["name"] for d in forced.defs] == ["a", "b", "c"]
    assert "defer_loading" not in forced.defs[2][1]["function"] and forced.deferred == []


@pytest.mark.parametrize("choice, expected", [
    (None, (None, True)),
    ({"type": "auto"}, ("auto", True)),
    ({"type": "auto", "disable_parallel_tool_use": True}, ("auto", False)),
    ({"type": "any"}, ("required", True)),
    ({"type": "any", "disable_parallel_tool_use": True}, ("required", False)),
    ({"type": "tool", "name": "a"}, ({"type": "function", "function": {"name": "a"}}, True)),
    ({"type": "none"}, ("none", True)),
])
def test_tool_choice(choice, expected) -> None:
    assert tool_choice(req(tool_choice=choice)) == expected


def test_thinking_options() -> None:
    assert thinking_options(req()).enable is None
    assert thinking_options(req(thinking={"type": "disabled"})).enable is False
    t = thinking_options(req(thinking={"type": "enabled", "budget_tokens": 1024}))
    assert (t.enable, t.budget, t.omit) == (True, 1024, False)
    assert thinking_options(req(thinking={"type": "adaptive", "display": "omitted"})).omit


# --------------------------------------------------------------------------- shaping


def test_folder_blocks_and_events() -> None:
    f = BlockFolder(SIGNER)
    events = f.add([ReasoningEvent("hm"), ReasoningEvent("m"), TextEvent("Hi "), TextEvent("there"),
                    ToolCallStart(0, "get"), ToolCallArgs(0, '{"city": '), ToolCallArgs(0, '"北京"}'), ToolCallEnd(0),
                    ToolCallStart(1, "get"), ToolCallArgs(1, '{}'), ToolCallEnd(1)])
    events += f.finish()
    blocks = f.content()
    assert blocks[0] == {"type": "thinking", "thinking": "hmm", "signature": SIGNER.sign("hmm")}
    assert blocks[1] == {"type": "text", "text": "Hi there"}
    assert blocks[2]["type"] == "tool_use" and blocks[2]["id"].startswith("toolu_") and blocks[2]["input"] == {"city": "北京"}
    assert blocks[3]["input"] == {} and blocks[3]["id"] != blocks[2]["id"]
    # Replaying the stream events gives the same blocks (what the SDK's accumulator does).
    rebuilt: list[dict] = []
    partial: dict[int, str] = {}
    for e in events:
        if e["type"] == "content_block_start":
            assert e["index"] == len(rebuilt)
            rebuilt.append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            d, b = e["delta"], rebuilt[e["index"]]
            if d["type"] == "text_delta":
                b["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                b["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                b["signature"] = d["signature"]
            elif d["type"] == "input_json_delta":
                partial[e["index"]] = partial.get(e["index"], "") + d["partial_json"]
    for i, text in partial.items():
        rebuilt[i]["input"] = json.loads(text)
    assert rebuilt == blocks
    assert [e["type"] for e in events].count("content_block_stop") == 4


def test_folder_omitted_thinking_and_whole_arguments() -> None:
    f = BlockFolder(SIGNER, omit_thinking=True, whole_arguments=True)
    events = f.add([ReasoningEvent("secret"), ToolCallStart(0, "w"), ToolCallArgs(0, '{"a"'), ToolCallArgs(0, ': 1}'),
                    ToolCallEnd(0)], final_arguments={0: '{"a": 2}'})
    assert not any(e.get("delta", {}).get("type") == "thinking_delta" for e in events)
    json_deltas = [e["delta"]["partial_json"] for e in events if e.get("delta", {}).get("type") == "input_json_delta"]
    assert json_deltas == ['{"a": 2}']
    blocks = f.content()
    assert blocks[0]["thinking"] == "" and blocks[0]["signature"] == SIGNER.sign("secret")
    assert blocks[1]["input"] == {"a": 2}


def test_cut_off_call_keeps_its_block_with_the_partial_input() -> None:
    f = BlockFolder(SIGNER)
    f.add([TextEvent("x"), ToolCallStart(0, "w"), ToolCallArgs(0, '{"a": 1, "b": "unfini')])
    events = f.finish()
    assert events == [{"type": "content_block_stop", "index": 1}]
    text, call = f.content()
    assert text == {"type": "text", "text": "x"}
    assert call["type"] == "tool_use" and call["name"] == "w" and call["input"] == {"a": 1}


def test_stop_reason_and_errors() -> None:
    assert stop_reason("tool_calls") == "tool_use"
    assert stop_reason("length") == "max_tokens"
    assert stop_reason("stop", "END") == "stop_sequence"
    assert stop_reason("stop") == "end_turn"
    assert error_body(413, "big") == {"type": "error", "error": {"type": "request_too_large", "message": "big"}}
    assert error_body(503, "x")["error"]["type"] == "overloaded_error"
    assert error_body(401, "x")["error"]["type"] == "authentication_error"


# --------------------------------------------------------------------------- signatures


def test_signature_is_keyed_and_verified() -> None:
    sig = SIGNER.sign("思考 <think>")
    assert sig.startswith("glmserve1.") and SIGNER.verify("思考 <think>", sig)
    assert not SIGNER.verify("思考 <think>!", sig)  # other text
    assert not SIGNER.verify("思考 <think>", sig[:-2] + ("AA" if not sig.endswith("AA") else "BB"))  # altered
    for bad in (None, "", "x", "glmserve1.", "glmserve1.!!!", sig.replace("glmserve1.", "glmserve0.")):
        assert not SIGNER.verify("思考 <think>", bad)
    assert not ThinkingSigner(ServerSecret.generate()).verify("思考 <think>", sig)  # another secret


def test_unverified_thinking_is_dropped_and_reported() -> None:
    good = SIGNER.sign("MINE")
    r = req(messages=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "MINE", "signature": good},
            {"type": "thinking", "thinking": "FORGED", "signature": good},  # a signature of other text
            {"type": "thinking", "thinking": "UNSIGNED"},
            {"type": "thinking", "thinking": "", "signature": good},  # display "omitted" sent back: nothing to give
            {"type": "text", "text": "a"}]},
        {"role": "user", "content": "q2"}])
    dropped: list[tuple[str, str]] = []
    msgs = to_openai_messages(r.system, r.messages, SIGNER, lambda p, why: dropped.append((p, why)))
    assert msgs[1] == {"role": "assistant", "content": "a", "reasoning_content": "MINE"}
    assert dropped == [("messages[1].content[1]", "invalid_signature"), ("messages[1].content[2]", "invalid_signature")]
    assert "reasoning_content" not in to_openai_messages(r.system, r.messages)[1]  # no signer: nothing verifies
