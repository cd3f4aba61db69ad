"""Parser events -> Responses API output items and stream events.

:class:`ResponseAssembler` is the one fold for both answers: the streamed endpoint sends the
events it returns, the non-streamed one discards them and returns :attr:`response`, so the
final object of a stream (``response.completed``) and a non-streamed response are built by
the same code from the same events and cannot disagree.

Items appear in the order the model produced them: a ``reasoning`` item per stretch of
reasoning, a ``message`` (one ``output_text`` part) per stretch of text, one
``function_call`` per call, or one ``custom_tool_call`` per call of a custom tool (its
``input`` streamed as ``response.custom_tool_call_input.delta`` / ``.done``, decoded from the
call's ``{"input": ...}`` arguments as they arrive).  Every event carries a ``sequence_number``; every
``output_item.added`` is followed by its ``output_item.done``.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Any

from glmserve.api.responses.seal import ReasoningSeal
from glmserve.api.responses.mapping import ToolNames
from glmserve.formats.base import Event, ReasoningEvent, TextEvent, ToolCallArgs, ToolCallEnd, ToolCallStart
from glmserve.formats.freeform import InputDecoder, input_of
from glmserve.formats.message import MessageBuilder


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(input_tokens: int, output_tokens: int, reasoning_tokens: int, cached: int | None = None) -> dict[str, Any]:
    """``input_tokens_details.cached_tokens``: the prompt tokens the engine's prefix cache served."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached or 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


class ResponseAssembler:
    """Folds one choice's events into a response object, returning the stream events."""

    def __init__(self, response: dict[str, Any], names: ToolNames | None = None, seal: ReasoningSeal | None = None,
                 include_encrypted: bool = False, hooked: bool = False, custom: frozenset[str] = frozenset()) -> None:
        self.response = response
        self.custom = custom
        """The (flat) names of the custom tools: their calls are ``custom_tool_call`` items."""
        self._inputs: dict[int, InputDecoder] = {}  # parser call index -> a custom call's input so far
        self.response.setdefault("output", [])
        self.names = names or ToolNames()
        self.seal = seal if include_encrypted else None
        self.hooked = hooked
        self.seq = 0
        self.items: list[dict[str, Any]] = []
        self._open: int | None = None  # output index of the open reasoning / message item
        self._text: list[str] = []  # the open item's text so far
        self._calls: dict[int, int] = {}  # parser call index -> output index
        self._ended: set[int] = set()
        self.output_tokens = 0
        self.reasoning_tokens = 0

    # ------------------------------------------------------------------ events

    def _ev(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def _snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.response)

    def start(self) -> list[dict[str, Any]]:
        self.response["status"] = "in_progress"
        return [self._ev("response.created", response=self._snapshot()),
                self._ev("response.in_progress", response=self._snapshot())]

    def _add(self, item: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        index = len(self.items)
        self.items.append(item)
        return index, [self._ev("response.output_item.added", output_index=index, item=copy.deepcopy(item))]

    def _open_item(self, kind: str) -> list[dict[str, Any]]:
        if self._open is not None and self.items[self._open]["type"] == kind:
            return []
        out = self._close_open("completed")
        if kind == "reasoning":
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        index, evs = self._add(item)
        out += evs
        out.append(self._ev("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part=part))
        self._open, self._text = index, []
        return out

    def _close_open(self, status: str) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        index, item = self._open, self.items[self._open]
        text = "".join(self._text)
        self._open, self._text = None, []
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out = [self._ev("response.reasoning_text.done", **common, text=text)]
            if self.seal is not None:
                item["encrypted_content"] = self.seal.seal(text)
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out = [self._ev("response.output_text.done", **common, text=text, logprobs=[])]
        item["content"] = [part]
        item["status"] = status
        out.append(self._ev("response.content_part.done", **common, part=copy.deepcopy(part)))
        out.append(self._ev("response.output_item.done", output_index=index, item=copy.deepcopy(item)))
        return out

    def feed(self, events: list[Event], builder: MessageBuilder, num_tokens: int = 0) -> list[dict[str, Any]]:
        """Stream events for a batch of parser events; ``builder`` has already folded them
        (it holds each call's id and final arguments)."""
        self.output_tokens += num_tokens
        if events and all(isinstance(e, ReasoningEvent) for e in events):
            self.reasoning_tokens += num_tokens
        out: list[dict[str, Any]] = []
        for ev in events:
            if isinstance(ev, ReasoningEvent) and ev.text:
                out += self._open_item("reasoning")
                self._text.append(ev.text)
                out.append(self._ev("response.reasoning_text.delta", item_id=self.items[self._open]["id"],
                                    output_index=self._open, content_index=0, delta=ev.text))
            elif isinstance(ev, TextEvent) and ev.text:
                out += self._open_item("message")
                self._text.append(ev.text)
                out.append(self._ev("response.output_text.delta", item_id=self.items[self._open]["id"],
                                    output_index=self._open, content_index=0, delta=ev.text, logprobs=[]))
            elif isinstance(ev, ToolCallStart):
                out += self._close_open("completed")
                call = builder.calls[ev.index]
                namespace, name = self.names.client(call.name)
                if call.name in self.custom:
                    item = {"id": new_id("ctc"), "type": "custom_tool_call", "status": "in_progress",
                            "call_id": call.id, "name": name, "input": ""}
                    self._inputs[ev.index] = InputDecoder()
                else:
                    item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call.id,
                            "name": name, "arguments": ""}
                if namespace is not None:
                    item["namespace"] = namespace
                index, evs = self._add(item)
                self._calls[ev.index] = index
                out += evs
            elif isinstance(ev, ToolCallArgs) and ev.delta and not self.hooked and ev.index in self._inputs:
                index = self._calls[ev.index]
                text = self._inputs[ev.index].feed(ev.delta)
                if text:
                    self.items[index]["input"] += text
                    out.append(self._ev("response.custom_tool_call_input.delta", item_id=self.items[index]["id"],
                                        output_index=index, delta=text))
            elif isinstance(ev, ToolCallArgs) and ev.delta and not self.hooked:
                index = self._calls[ev.index]
                self.items[index]["arguments"] += ev.delta  # so far (a cut call keeps them)
                out.append(self._ev("response.function_call_arguments.delta", item_id=self.items[index]["id"],
                                    output_index=index, delta=ev.delta))
            elif isinstance(ev, ToolCallEnd):
                out += self._end_call(ev.index, builder)
        return out

    def _end_call(self, call_index: int, builder: MessageBuilder) -> list[dict[str, Any]]:
        index = self._calls[call_index]
        item = self.items[index]
        arguments = builder.calls[call_index].arguments
        custom = call_index in self._inputs
        kind = "custom_tool_call_input" if custom else "function_call_arguments"
        key, value = ("input", input_of(arguments)) if custom else ("arguments", arguments)
        out = []
        if self.hooked:  # the hook may have rewritten them: sent whole, once final
            out.append(self._ev(f"response.{kind}.delta", item_id=item["id"], output_index=index, delta=value))
        item[key] = value
        item["status"] = "completed"
        self._ended.add(call_index)
        done = {"input": value} if custom else {"name": item["name"], "arguments": value}
        out.append(self._ev(f"response.{kind}.done", item_id=item["id"], output_index=index, **done))
        out.append(self._ev("response.output_item.done", output_index=index, item=copy.deepcopy(item)))
        return out

    def finish(self, finish_reason: str | None, input_tokens: int, cached_tokens: int | None = None
               ) -> list[dict[str, Any]]:
        """Close what is open and return the final event (``response.completed``, or
        ``response.incomplete`` when the output limit cut the answer short)."""
        cut = finish_reason == "length"
        out = self._close_open("incomplete" if cut else "completed")
        for call_index, index in self._calls.items():
            if call_index not in self._ended:  # cut off mid-call: kept, as far as it got, marked incomplete
                item = self.items[index]
                item["status"] = "incomplete"
                out.append(self._ev("response.output_item.done", output_index=index, item=copy.deepcopy(item)))
        r = self.response
        r["output"] = list(self.items)
        r["usage"] = usage(input_tokens, self.output_tokens, self.reasoning_tokens, cached_tokens)
        if cut:
            r["status"] = "incomplete"
            r["incomplete_details"] = {"reason": "max_output_tokens"}
            out.append(self._ev("response.incomplete", response=self._snapshot()))
        else:
            r["status"] = "completed"
            r["completed_at"] = int(time.time())
            out.append(self._ev("response.completed", response=self._snapshot()))
        return out

    def fail(self, message: str, code: str = "server_error") -> list[dict[str, Any]]:
        """In-band failure once the stream has begun: an ``error`` event, then ``response.failed``."""
        r = self.response
        r["status"] = "failed"
        r["error"] = {"code": code, "message": message}
        r["output"] = [item for item in self.items if item.get("status") == "completed"]
        return [self._ev("error", code=code, message=message, param=None),
                self._ev("response.failed", response=self._snapshot())]


def sse(event: dict[str, Any]) -> str:
    """One server-sent event, named like its type (as OpenAI sends them)."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
