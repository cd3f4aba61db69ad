"""Parser events -> Anthropic content blocks and stream events.

One :class:`BlockFolder` per answer folds the format's events into ``thinking`` / ``text`` /
``tool_use`` blocks in the order the model produced them, and says which stream events
each step is.  The streamed answer and the non-streamed one are both this fold, so the
``messages.stream`` helper's final message equals ``messages.create``'s.
"""

from __future__ import annotations

import base64
import json
import uuid

import pydantic_core
from dataclasses import dataclass, field
from typing import Any

from glmserve.formats.base import Event, ReasoningEvent, TextEvent, ToolCallArgs, ToolCallEnd, ToolCallStart
from glmserve.server_secret import ServerSecret

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "invalid_request_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def sse(event: dict[str, Any]) -> str:
    """One server-sent event; the event name is the payload's ``type``, as Anthropic sends it."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


SIGNATURE_PREFIX = "glmserve1."
SIGNATURE_PURPOSE = "anthropic.thinking-signature"


class ThinkingSigner:
    """The ``signature`` of a thinking block: ``glmserve1.`` + the base64url HMAC-SHA256 of the
    thinking text under a key derived from the server secret (:mod:`glmserve.server_secret`).

    Clients send thinking blocks back with their signature; a block's thinking becomes the
    model's own reasoning history only if its signature verifies under the current or a
    previous secret (:func:`glmserve.api.anthropic.mapping.to_openai_messages`).  It proves the
    text is what this server (or a replica sharing its secret) produced; it hides nothing: the
    text itself is in the block.
    """

    def __init__(self, secret: ServerSecret) -> None:
        self.secret = secret

    def sign(self, thinking: str) -> str:
        mac = self.secret.mac(SIGNATURE_PURPOSE, thinking.encode("utf-8"))
        return SIGNATURE_PREFIX + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def verify(self, thinking: str, signature: str | None) -> bool:
        if not signature or not signature.startswith(SIGNATURE_PREFIX):
            return False
        body = signature[len(SIGNATURE_PREFIX):]
        try:
            mac = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (ValueError, UnicodeError):
            return False
        return self.secret.verify(SIGNATURE_PURPOSE, thinking.encode("utf-8"), mac)


def stop_reason(finish_reason: str | None, stop_sequence: str | None = None) -> str:
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    if stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def usage(prompt_tokens: int, output_tokens: int, cached: int | None = None) -> dict[str, Any]:
    """Anthropic's split of the prompt: ``cache_read_input_tokens`` are those the engine's prefix
    cache served, ``input_tokens`` the rest (their sum is the prompt, as Anthropic counts)."""
    hits = cached or 0
    return {"input_tokens": prompt_tokens - hits, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": hits}


@dataclass
class BlockFolder:
    """Folds one answer's events into content blocks, returning stream events as it goes.

    ``signer`` gives each thinking block its signature.  ``omit_thinking``: thinking blocks keep their signature but not their text (Anthropic's
    ``display: "omitted"``).  ``whole_arguments``: arguments go out in one piece when the call
    ends (an argument hook may rewrite them, so fragments could disagree with the result).
    """

    signer: ThinkingSigner
    omit_thinking: bool = False
    whole_arguments: bool = False
    blocks: list[dict[str, Any]] = field(default_factory=list)
    _open: int | None = None
    _kind: str | None = None
    _thinking: list[str] = field(default_factory=list)
    _args: dict[int, list[str]] = field(default_factory=dict)
    _call_block: dict[int, int] = field(default_factory=dict)
    _complete: set[int] = field(default_factory=set)

    def _close(self, out: list[dict[str, Any]]) -> None:
        if self._open is None:
            return
        if self._kind == "thinking":
            text = "".join(self._thinking)
            sig = self.signer.sign(text)
            self.blocks[self._open]["signature"] = sig
            if not self.omit_thinking:
                self.blocks[self._open]["thinking"] = text
            out.append({"type": "content_block_delta", "index": self._open,
                        "delta": {"type": "signature_delta", "signature": sig}})
            self._thinking = []
        out.append({"type": "content_block_stop", "index": self._open})
        self._open = None
        self._kind = None

    def _start(self, kind: str, block: dict[str, Any], out: list[dict[str, Any]]) -> int:
        self._close(out)
        self.blocks.append(block)
        self._open = len(self.blocks) - 1
        self._kind = kind
        out.append({"type": "content_block_start", "index": self._open, "content_block": dict(block)})
        return self._open

    def add(self, events: list[Event], final_arguments: dict[int, str] | None = None) -> list[dict[str, Any]]:
        """Stream events for ``events``.  ``final_arguments`` maps a call index to its final
        arguments text (after the argument hook) for the calls that end in this batch."""
        out: list[dict[str, Any]] = []
        for ev in events:
            if isinstance(ev, ReasoningEvent):
                if not ev.text:
                    continue
                if self._kind != "thinking":
                    self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
                self._thinking.append(ev.text)
                if not self.omit_thinking:
                    out.append({"type": "content_block_delta", "index": self._open,
                                "delta": {"type": "thinking_delta", "thinking": ev.text}})
            elif isinstance(ev, TextEvent):
                if not ev.text:
                    continue
                if self._kind != "text":
                    self._start("text", {"type": "text", "text": ""}, out)
                assert self._open is not None
                self.blocks[self._open]["text"] += ev.text
                out.append({"type": "content_block_delta", "index": self._open,
                            "delta": {"type": "text_delta", "text": ev.text}})
            elif isinstance(ev, ToolCallStart):
                block = {"type": "tool_use", "id": new_tool_use_id(), "name": ev.name, "input": {}}
                self._call_block[ev.index] = self._start("tool_use", block, out)
                self._args[ev.index] = []
            elif isinstance(ev, ToolCallArgs):
                if not ev.delta:
                    continue
                self._args[ev.index].append(ev.delta)
                if not self.whole_arguments:
                    out.append({"type": "content_block_delta", "index": self._call_block[ev.index],
                                "delta": {"type": "input_json_delta", "partial_json": ev.delta}})
            elif isinstance(ev, ToolCallEnd):
                idx = self._call_block[ev.index]
                text = "".join(self._args[ev.index])
                if final_arguments is not None and ev.index in final_arguments:
                    text = final_arguments[ev.index]
                if self.whole_arguments and text:
                    out.append({"type": "content_block_delta", "index": idx,
                                "delta": {"type": "input_json_delta", "partial_json": text}})
                self.blocks[idx]["input"] = json.loads(text) if text.strip() else {}
                self._complete.add(ev.index)
                if self._open == idx:
                    self._close(out)
        return out

    def finish(self) -> list[dict[str, Any]]:
        """Close the open block (a call cut off by max_tokens stays as far as it got)."""
        out: list[dict[str, Any]] = []
        self._close(out)
        return out

    def content(self) -> list[dict[str, Any]]:
        """The final content blocks.  A call cut off by max_tokens keeps its ``tool_use`` block
        (``stop_reason`` says ``max_tokens``) with the input its partial JSON reads as, the way
        the SDK's stream accumulator (jiter, partial mode) reads the same fragments."""
        for i, k in self._call_block.items():
            if i not in self._complete:
                text = "" if self.whole_arguments else "".join(self._args[i])
                self.blocks[k]["input"] = partial_input(text)
        return list(self.blocks)


def partial_input(text: str) -> Any:
    """A cut call's arguments prefix as a value: complete members kept, a trailing partial one
    dropped (pydantic-core's ``from_json`` partial mode, the jiter mode the SDK uses)."""
    if not text.strip():
        return {}
    try:
        return pydantic_core.from_json(text, allow_partial=True)
    except ValueError:  # not even a JSON prefix (an unconstrained model's garbage)
        return {}
