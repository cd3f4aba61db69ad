"""Folding parser events into the final assistant message.

Streaming and non-streaming responses are both built from the same events, so the
streamed fragments and the non-streamed message cannot disagree.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from glmserve.formats.base import (
    Event,
    ReasoningEvent,
    TextEvent,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class BuiltCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class MessageBuilder:
    """Accumulates events; ``message()`` gives the OpenAI assistant message."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[BuiltCall] = field(default_factory=list)

    def add(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, TextEvent):
                self.content.append(ev.text)
            elif isinstance(ev, ReasoningEvent):
                self.reasoning.append(ev.text)
            elif isinstance(ev, ToolCallStart):
                self.calls.append(BuiltCall(id=new_call_id(), name=ev.name))
            elif isinstance(ev, ToolCallArgs):
                self.calls[ev.index].arguments += ev.delta
            elif isinstance(ev, ToolCallEnd):
                self.calls[ev.index].complete = True

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    def message(self) -> dict:
        """The Chat Completions assistant message.  Reasoning is sent under both of its names:
        ``reasoning`` (vLLM's since its PR #33402) and ``reasoning_content`` (DeepSeek's, older
        vLLM's), since clients read one or the other."""
        msg: dict = {"role": "assistant", "content": self.text or None}
        if self.reasoning:
            msg["reasoning"] = msg["reasoning_content"] = self.reasoning_text
        if self.calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls
            ]
        return msg


def merge_events(events: list[Event]) -> list[Event]:
    """Coalesce adjacent text/reasoning/argument events (for comparing splits in tests)."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, TextEvent) and isinstance(prev, TextEvent):
            out[-1] = TextEvent(prev.text + ev.text)
        elif isinstance(ev, ReasoningEvent) and isinstance(prev, ReasoningEvent):
            out[-1] = ReasoningEvent(prev.text + ev.text)
        elif isinstance(ev, ToolCallArgs) and isinstance(prev, ToolCallArgs) and prev.index == ev.index:
            out[-1] = ToolCallArgs(ev.index, prev.delta + ev.delta)
        elif isinstance(ev, (TextEvent, ReasoningEvent)) and not ev.text:
            continue
        elif isinstance(ev, ToolCallArgs) and not ev.delta:
            continue
        else:
            out.append(ev)
    return out
