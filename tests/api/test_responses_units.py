"""Unit tests of the Responses API pieces that need no server: request mapping, the
reasoning seal, the SQLite store and the event assembler (checked against the ``openai``
package's own types)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from glmserve.api.errors import APIError
from glmserve.api.responses.seal import InvalidSeal, ReasoningSeal
from glmserve.server_secret import ServerSecret, _defaults, default_secret
from glmserve.api.responses.mapping import (
    collect_tools,
    items_to_messages,
    parse_items,
    text_format,
    thinking,
    tool_choice,
)
from glmserve.api.responses.schemas import ResponsesRequest
from glmserve.api.responses.shape import ResponseAssembler
from glmserve.api.responses.store import ChainBroken
from glmserve.api.responses.store_sqlite import SQLiteStore
from glmserve.formats.base import ReasoningEvent, TextEvent, ToolCallArgs, ToolCallEnd, ToolCallStart
from glmserve.formats.message import MessageBuilder

DATA = Path(__file__).parents[1] / "data"
EVENT = TypeAdapter(ResponseStreamEvent)


def codex_body() -> dict:
    return json.loads((DATA / "codex_exec_request.json").read_text())["body"]


# --------------------------------------------------------------------------- mapping


def test_codex_request_maps_to_messages_and_flat_tools():
    req = ResponsesRequest.model_validate(codex_body())
    assert req.store is False and req.stream and req.include_encrypted_reasoning
    msgs = items_to_messages(req.input, req.instructions)
    assert [m["role"] for m in msgs] == ["system", "system", "user", "user"]
    assert msgs[-1]["content"] == "say hi"
    tools = collect_tools(req.tools)
    names = [d["function"]["name"] for _, d in tools.defs]
    assert "exec_command" in names
    assert "multi_agent_v1__spawn_agent" in names  # the namespace, flattened
    assert tools.names.client("multi_agent_v1__spawn_agent") == ("multi_agent_v1", "spawn_agent")
    assert tools.names.client("exec_command") == (None, "exec_command")
    assert tools.left_out == ["web_search"]
    assert tool_choice(req.tool_choice, tools)[0] == "auto"
    param, spawn = next(d for d in tools.defs if d[1]["function"]["name"] == "multi_agent_v1__spawn_agent")
    assert param.startswith("tools[") and ".tools[" in param and spawn["function"]["strict"] is False


def test_only_hosted_tools_means_no_tools():
    tools = collect_tools([{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["x"]}])
    assert tools.defs == [] and tools.left_out == ["web_search", "file_search"]
    assert tool_choice("auto", tools)[0] == "none"
    assert tool_choice(None, tools)[0] == "none"


def test_tool_choice_forms():
    tools = collect_tools([{"type": "function", "name": "a", "parameters": {"type": "object"}},
                           {"type": "function", "name": "b"},
                           {"type": "namespace", "name": "ns", "description": "d",
                            "tools": [{"type": "function", "name": "c"}]}])
    assert tool_choice({"type": "function", "name": "a"}, tools)[0] == {"name": "a"}
    assert tool_choice({"type": "function", "name": "c", "namespace": "ns"}, tools)[0] == {"name": "ns__c"}
    choice, narrowed = tool_choice({"type": "allowed_tools", "mode": "required",
                                    "tools": [{"type": "function", "name": "b"}]}, tools)
    assert choice == "required" and [d[1]["function"]["name"] for d in narrowed.defs] == ["b"]
    with pytest.raises(APIError) as e:
        tool_choice({"type": "web_search_preview"}, tools)
    assert e.value.status == 400 and e.value.param == "tool_choice"
    with pytest.raises(APIError) as e:
        collect_tools([{"type": "function", "parameters": {}}])
    assert e.value.param == "tools[0].name"


def test_items_fold_into_turns_with_reasoning_and_calls():
    seal = ReasoningSeal(ServerSecret.generate())
    sealed = seal.seal("I should look it up")
    req = ResponsesRequest.model_validate({"instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": sealed},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": {"city": "北京"}},
        {"type": "function_call", "call_id": "c2", "name": "spawn_agent", "namespace": "ns", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "ok"}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "done"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
        {"role": "developer", "content": "next"},
    ]})
    msgs = items_to_messages(req.input, req.instructions, seal)
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[2]["role"] == "assistant" and msgs[2]["reasoning_content"] == "I should look it up"
    assert [c["function"]["name"] for c in msgs[2]["tool_calls"]] == ["get_weather", "ns__spawn_agent"]
    assert json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"]) == {"city": "北京"}
    assert msgs[3] == {"role": "tool", "tool_call_id": "c1", "content": "sunny", "name": "get_weather"}
    assert msgs[4]["content"] == "ok" and msgs[4]["name"] == "ns__spawn_agent"
    # plain reasoning the client sent (no seal) is not taken as the model's own ...
    assert msgs[5] == {"role": "assistant", "content": "Sunny.", "reasoning_content": ""}
    assert msgs[6] == {"role": "system", "content": "next"}
    # ... the same items read from the server's own store (previous_response_id) are
    assert items_to_messages(req.input, req.instructions, seal, stored=len(req.input))[5]["reasoning_content"] == "done"


def test_bad_items_are_400_with_their_path(tmp_path):
    seal = ReasoningSeal(ServerSecret.generate())
    cases = [
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,@@"}]}],
         "input[0].content[0].image_url"),
        ([{"role": "user", "content": "a"}, {"type": "item_reference", "id": "msg_1"}], "input[1]"),
        ([{"type": "computer_call_output", "call_id": "x"}], "input[0].type"),
    ]
    for items, param in cases:
        req = ResponsesRequest.model_validate({"input": items})
        with pytest.raises(APIError) as e:
            items_to_messages(req.input, None, seal)
        assert e.value.status == 400 and e.value.param == param, (items, e.value.param)


def test_reasoning_effort_and_text_format():
    assert thinking(ResponsesRequest.model_validate({"input": "x"})) == (True, None)
    assert thinking(ResponsesRequest.model_validate({"input": "x", "reasoning": {"effort": "none"}})) == (False, "none")
    assert thinking(ResponsesRequest.model_validate({"input": "x", "reasoning": {"effort": "high"}})) == (True, "high")
    assert text_format(ResponsesRequest.model_validate({"input": "x"}))[0] is None
    assert text_format(ResponsesRequest.model_validate({"input": "x", "text": {"format": {"type": "json_object"}}}))[0] \
        == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    got = text_format(ResponsesRequest.model_validate(
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "r", "schema": schema}}}))
    assert got == (schema, "text.format.schema")


def test_seal_round_trip_and_persistence(tmp_path):
    path = tmp_path / "secrets" / "server.key"
    token = ReasoningSeal(default_secret(path)).seal("思考 <think>")
    assert "思考" not in token
    _defaults.clear()  # as a restarted server: read the file again
    assert ReasoningSeal(default_secret(path)).open(token) == "思考 <think>"  # a restarted server reads it
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    with pytest.raises(InvalidSeal):
        ReasoningSeal(default_secret(path)).open(token[:-4] + "AAAA")
    with pytest.raises(InvalidSeal):  # another secret, or another purpose's key, does not open it
        ReasoningSeal(ServerSecret.generate()).open(token)


def test_a_seal_is_authoritative_over_plain_text_beside_it():
    seal = ReasoningSeal(ServerSecret.generate())
    forged = ReasoningSeal(ServerSecret.generate()).seal("FORGED")
    dropped: list[tuple[str, str]] = []

    def fold(item: dict) -> dict:
        req = ResponsesRequest.model_validate({"input": [{"role": "user", "content": "q"}, item]})
        return items_to_messages(req.input, None, seal, on_drop=lambda p, r: dropped.append((p, r)))[1]

    plain = [{"type": "reasoning_text", "text": "PLAIN"}]
    # a seal that opens wins over the plain text beside it
    assert fold({"type": "reasoning", "summary": [], "content": plain,
                 "encrypted_content": seal.seal("SEALED")})["reasoning_content"] == "SEALED"
    assert dropped == []
    # a seal that does not open drops the item's reasoning, its plain text too
    for bad in (forged, "gAAAA-not-a-token", seal.seal("SEALED")[:-6] + "AAAAAA"):
        assert fold({"type": "reasoning", "summary": [], "content": plain, "encrypted_content": bad})["reasoning_content"] == ""
    assert dropped == [("input[1].encrypted_content", "invalid_seal")] * 3
    # without a seal to check against, sealed reasoning is dropped as well
    req = ResponsesRequest.model_validate({"input": [{"type": "reasoning", "summary": [], "content": plain,
                                                     "encrypted_content": seal.seal("SEALED")}]})
    assert items_to_messages(req.input)[0]["reasoning_content"] == ""
    # unsealed plain reasoning the client wrote is never the model's own: dropped and reported,
    # as an Anthropic thinking block without a valid signature is ...
    dropped.clear()
    assert fold({"type": "reasoning", "summary": [], "content": plain})["reasoning_content"] == ""
    assert dropped == [("input[1].content", "unsealed")]
    # ... unless it comes from the server's own store (the history previous_response_id reads)
    req = ResponsesRequest.model_validate({"input": [{"role": "user", "content": "q"},
                                                     {"type": "reasoning", "summary": [], "content": plain}]})
    assert items_to_messages(req.input, None, seal, stored=2)[1]["reasoning_content"] == "PLAIN"
    # a summary alone carries no reasoning: nothing to keep, nothing reported
    dropped.clear()
    assert fold({"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}]})["reasoning_content"] == ""
    assert dropped == []


# --------------------------------------------------------------------------- store


@pytest.mark.asyncio
async def test_store_owner_restart_and_chain(tmp_path):
    db = tmp_path / "r.sqlite3"
    store = SQLiteStore(db)
    r1 = {"id": "resp_1", "output": [{"type": "message", "role": "assistant", "status": "completed",
                                      "content": [{"type": "output_text", "text": "hi", "annotations": []}]}]}
    await store.put("k1", r1, [{"type": "message", "role": "user", "content": "hello"}], None)
    r2 = {"id": "resp_2", "output": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}
    await store.put("k1", r2, [{"type": "message", "role": "user", "content": "again"}], "resp_1")
    await store.close()

    store = SQLiteStore(db)  # a restarted server
    assert (await store.get("k1", "resp_2")).response == r2
    assert await store.get("k2", "resp_2") is None  # another key sees nothing
    history = await store.history("k1", "resp_2")
    assert [i.get("content", i.get("name")) for i in history] == ["hello", r1["output"][0]["content"], "again", "f"]
    msgs = items_to_messages(parse_items(history))
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert await store.history("k2", "resp_2") is None
    assert not await store.delete("k2", "resp_1")
    assert await store.delete("k1", "resp_1")
    with pytest.raises(ChainBroken):
        await store.history("k1", "resp_2")
    await store.close()


# --------------------------------------------------------------------------- assembler


def _run(events_per_delta, finish="stop", hooked=False, include=False, seal=None, names=None):
    builder = MessageBuilder()
    asm = ResponseAssembler({"id": "resp_x", "object": "response", "created_at": 1, "model": "m",
                             "parallel_tool_calls": True, "tool_choice": "auto", "tools": []},
                            names=names, seal=seal, include_encrypted=include, hooked=hooked)
    out = asm.start()
    for events in events_per_delta:
        builder.add(events)
        out += asm.feed(events, builder, 1)
    out += asm.finish(finish, 10)
    return asm, out, builder


def test_assembler_events_are_valid_and_rebuild_the_response(tmp_path):
    seal = ReasoningSeal(ServerSecret.generate())
    deltas = [[ReasoningEvent("th")], [ReasoningEvent("ink")], [TextEvent("Hel"), TextEvent("lo")],
              [ToolCallStart(0, "get")], [ToolCallArgs(0, '{"a"')], [ToolCallArgs(0, ": 1}"), ToolCallEnd(0)],
              [ToolCallStart(1, "ns__f")], [ToolCallArgs(1, "{}"), ToolCallEnd(1)]]
    from glmserve.api.responses.mapping import ToolNames

    asm, events, builder = _run(deltas, "tool_calls", include=True, seal=seal,
                                names=ToolNames({"ns__f": ("ns", "f")}))
    for ev in events:
        EVENT.validate_python(ev)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = Response.model_validate(asm.response)
    assert final.status == "completed"
    kinds = [o.type for o in final.output]
    assert kinds == ["reasoning", "message", "function_call", "function_call"]
    assert final.output[0].content[0].text == "think"
    assert seal.open(final.output[0].encrypted_content) == "think"
    assert final.output[1].content[0].text == "Hello"
    call = final.output[2]
    args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                   and e["output_index"] == 2)
    assert call.arguments == args == '{"a": 1}' and call.call_id == builder.calls[0].id
    assert (final.output[3].name, final.output[3].namespace) == ("f", "ns")
    assert final.usage.output_tokens == 8 and final.usage.output_tokens_details.reasoning_tokens == 2
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert sorted(added) == sorted(done) == [0, 1, 2, 3]
    assert events[-1]["type"] == "response.completed" and events[-1]["response"] == asm.response


def test_assembler_cut_off_is_incomplete_and_keeps_the_partial_call():
    asm, events, _ = _run([[TextEvent("a")], [ToolCallStart(0, "get")], [ToolCallArgs(0, '{"a": ')]], "length")
    for ev in events:
        EVENT.validate_python(ev)
    final = Response.model_validate(asm.response)
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.status) for o in final.output] == [("message", "completed"), ("function_call", "incomplete")]
    assert final.output[1].arguments == '{"a": '
    assert events[-1]["type"] == "response.incomplete"
    # under an argument hook the partial arguments were never sent, and are not in the answer either
    asm, _, _ = _run([[ToolCallStart(0, "get")], [ToolCallArgs(0, '{"a": ')]], "length", hooked=True)
    assert asm.response["output"][0]["arguments"] == "" and asm.response["output"][0]["status"] == "incomplete"


def test_assembler_hooked_sends_whole_arguments():
    deltas = [[ToolCallStart(0, "get")], [ToolCallArgs(0, '{"a": 1}'), ToolCallEnd(0)]]
    asm, events, builder = _run(deltas, "tool_calls", hooked=True)
    arg_deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert arg_deltas == ['{"a": 1}']


def test_assembler_fail_event():
    builder = MessageBuilder()
    asm = ResponseAssembler({"id": "resp_x", "object": "response", "created_at": 1, "model": "m",
                             "parallel_tool_calls": True, "tool_choice": "auto", "tools": []})
    events = asm.start() + asm.feed([TextEvent("x")], builder, 1) + asm.fail("engine died")
    for ev in events:
        EVENT.validate_python(ev)
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["code"] == "server_error"
