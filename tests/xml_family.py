"""What the GLM-4.5 and GLM-4.7 format tests share: tools, requests, parsing helpers."""

from __future__ import annotations

import json
from typing import Any

from glmserve.formats.base import ChatFormat, ChatRequest, Tool
from glmserve.formats.message import MessageBuilder, merge_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TYPED = {
    "type": "function",
    "function": {
        "name": "typed",
        "parameters": {
            "type": "object",
            "properties": {
                "n": {"type": "integer"},
                "b": {"type": "boolean"},
                "o": {"type": "object"},
                "s": {"type": "string"},
                "any": {},
                "u": {"type": ["string", "null"]},
            },
        },
    },
}
NOARGS = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [Tool.from_openai(t) for t in (WEATHER, TYPED, NOARGS)]


def request(messages: list[dict[str, Any]] | None = None, tools: list[Tool] | None = None, **kw: Any) -> ChatRequest:
    return ChatRequest(messages=messages or [{"role": "user", "content": "hi"}], tools=TOOLS if tools is None else tools, **kw)


def parse_with(fmt: ChatFormat, text: str, req: ChatRequest | None = None, pieces: list[str] | None = None,
               cut: bool = False):
    """Events (merged), message and incomplete flag for an output fed in pieces (``cut``: it
    ended at the token limit)."""
    p = fmt.parser(req or request())
    events = []
    for piece in pieces if pieces is not None else [text]:
        events += p.feed(piece)
    events += p.finish(cut=cut)
    b = MessageBuilder()
    b.add(events)
    return merge_events(events), b.message(), p.incomplete_call


def calls_of(msg: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])]


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(text)]:
        out.append(text[prev:p])
        prev = p
    return out


def no_ids(msg: dict[str, Any]) -> dict[str, Any]:
    msg = json.loads(json.dumps(msg))
    for c in msg.get("tool_calls", []):
        c.pop("id")
    return msg
