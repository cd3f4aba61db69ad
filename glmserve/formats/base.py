"""The contract every chat format implements.

A *format* owns one model family's wire format end to end: how a request becomes a
prompt, which strings stop generation, how decoding is constrained for a
``tool_choice``, and how raw output text becomes events.  Nothing here knows about
HTTP or vLLM, so formats are tested with plain strings.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Union

# --------------------------------------------------------------------------- prompt


@dataclass(frozen=True)
class Control:
    """A control token placed by the template (``<|user|>``, ``<tool_call>``...).

    Only these become control-token ids; every other character of the prompt, user text
    included, is tokenized as plain text, so a user cannot forge a turn by typing one.
    """

    token: str


PromptPart = Union[str, Control]

# Markers several families write (Hermes-style call tags, reasoning tags).
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass
class Prompt:
    """A rendered prompt: plain-text parts interleaved with control tokens."""

    parts: list[PromptPart] = field(default_factory=list)

    def add(self, *items: PromptPart) -> "Prompt":
        for item in items:
            if isinstance(item, Control) or item:
                self.parts.append(item)
        return self

    @property
    def text(self) -> str:
        return "".join(p.token if isinstance(p, Control) else p for p in self.parts)

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.text


# --------------------------------------------------------------------------- request view


@dataclass
class Tool:
    """One declared function.  ``raw`` is the tool object exactly as the client sent it
    (GLM-4.5 prints it verbatim in the prompt)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    param: str | None = field(default=None, compare=False)
    """The request field that declared it (``tools[3].function``), so an error about the tool
    names the client's own index, not its place after hosted or deferred tools were set aside."""
    freeform: tuple[str, str] | None = None
    """A custom (freeform) tool's input format, ``(syntax, definition)`` with syntax ``text`` /
    ``lark`` / ``regex`` (:mod:`glmserve.formats.freeform`): the model sees a function taking
    one string, ``input``, and the input is constrained to the grammar."""

    @property
    def function(self) -> dict[str, Any]:
        """The OpenAI ``function`` object (what GLM-4 prints as indented JSON)."""
        fn = self.raw.get("function", self.raw) if self.raw else {}
        if fn:
            return fn
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        if self.parameters is not None:
            out["parameters"] = self.parameters
        return out

    @property
    def deferred(self) -> bool:
        """``"defer_loading": true`` in the function object: a tool the client loads on demand
        (Claude Code's tool search).  It is listed nowhere up front and is callable only once a
        ``tool_reference`` result names it (or ``tool_choice`` does)."""
        return bool(self.function.get("defer_loading"))

    @classmethod
    def from_openai(cls, obj: dict[str, Any]) -> "Tool":
        if obj.get("type") == "custom":
            return cls.custom(obj.get("custom", obj))
        fn = obj.get("function", obj) if obj.get("type", "function") == "function" else obj
        return cls(
            name=fn["name"],
            description=fn.get("description"),
            parameters=fn.get("parameters"),
            strict=fn.get("strict"),
            raw=obj,
        )

    @classmethod
    def custom(cls, obj: dict[str, Any]) -> "Tool":
        """A custom tool (``{"name", "description", "format"}``, the format already valid) as the
        function the model is shown: one string argument, ``input``."""
        from glmserve.formats import freeform

        syntax, definition = freeform.read_format(obj.get("format"))
        fn: dict[str, Any] = {"name": obj["name"]}
        if obj.get("description") is not None:
            fn["description"] = obj["description"]
        fn["parameters"] = freeform.input_parameters(syntax, definition)
        if obj.get("defer_loading"):
            fn["defer_loading"] = True
        return cls(name=obj["name"], description=obj.get("description"), parameters=fn["parameters"],
                   raw={"type": "function", "function": fn}, freeform=(syntax, definition))


ToolChoice = Union[Literal["none", "auto", "required"], str]
"""``none`` / ``auto`` / ``required``, or the name of the one tool that must be called
(a named ``tool_choice`` is normalised to its name before it reaches a format)."""


@dataclass
class ChatRequest:
    """What a format needs from a chat request, already validated by the API layer.

    ``messages`` are OpenAI message dicts whose ``content`` has been flattened to a
    string (or None); assistant ``tool_calls`` keep the OpenAI shape with
    ``function.arguments`` as a JSON string.  A tool message with ``tool_reference`` parts
    also carries ``tool_references`` (the referenced tool names, in order) and
    ``content_parts``: its parts in order, ``{"type": "text", "text"}`` and
    ``{"type": "tool_reference", "name"}`` (``content`` is then its text parts joined).
    Each family shows a referenced tool's definition at that result (GLM-5.1+ as their
    template does; the others in their own tool-definition format).

    ``clear_thinking`` None means the family's default (GLM-4.7 / 5.1 drop reasoning of
    turns before the last user message, GLM-5.3 keeps it).  ``reasoning_effort`` is the
    Chat Completions field as sent (GLM-5.3 writes it as its ``Reasoning Effort`` line).

    ``messages`` are kept with each turn's tool results in its calls' order
    (:func:`results_in_call_order`): no family's prompt shows the ids that pair a result
    with its call, and clients send parallel results in the order the tools finished.
    """

    messages: list[dict[str, Any]]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    enable_thinking: bool = True
    clear_thinking: bool | None = None
    add_generation_prompt: bool = True
    reasoning_effort: str | None = None

    def __post_init__(self) -> None:
        self.messages = results_in_call_order(self.messages)

    @property
    def referenced_tools(self) -> set[str]:
        """Names of the tools a ``tool_reference`` result in the conversation names."""
        return {n for m in self.messages for n in (m.get("tool_references") or ())}

    @property
    def tools_in_prompt(self) -> list[Tool]:
        """The tools the model may call: none for ``tool_choice="none"``; a deferred tool only
        once a ``tool_reference`` result named it, or when ``tool_choice`` names it.  The
        parser and the decoding constraint take exactly these."""
        if self.tool_choice == "none":
            return []
        if not any(t.deferred for t in self.tools):
            return self.tools
        referenced = self.referenced_tools
        return [t for t in self.tools if not t.deferred or t.name in referenced or t.name == self.tool_choice]

    @property
    def listed_tools(self) -> list[Tool]:
        """The tools listed in the prompt's tool block: the callable ones without the deferred
        ones (a referenced deferred tool is shown at its reference, so the block, and the
        cached prompt prefix, stay the same when a tool is loaded)."""
        return [t for t in self.tools_in_prompt if not t.deferred]


def _id_of(obj: dict[str, Any]) -> str:
    """A call's or a result's id: ``tool_call_id``, else ``id``, as text ("" when neither),
    as GLM-5.3's template reads it."""
    for key in ("tool_call_id", "id"):
        if obj.get(key):
            return str(obj[key])
    return ""


def results_in_call_order(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with each run of tool results put in the order of the calls they answer.

    A run is the tool messages right after an assistant message with ``tool_calls`` (every
    API maps its results there: Chat ``tool_call_id``, Messages ``tool_use_id``, Responses
    ``call_id``).  A result is matched when its id names exactly one of those calls and no
    other result in the run carries it; the matched results fill their own places in the run
    in the calls' order, and every other result (no id, an unknown or a repeated one) keeps
    its place.  When every result is matched this is GLM-5.3's template rule; the other
    templates show results in the order given, with no ids, so a parallel turn whose results
    came back in the order the tools finished would pair each call with another's result.
    Returns ``messages`` itself when nothing moves."""
    out = messages
    i = 0
    while i < len(messages):
        calls = messages[i].get("tool_calls") if messages[i].get("role") == "assistant" else None
        start = end = i + 1
        while end < len(messages) and messages[end].get("role") == "tool":
            end += 1
        i = end
        if not calls or end - start < 2:
            continue
        call_ids = [_id_of(c) for c in calls if isinstance(c, dict)]
        ids = [_id_of(m) for m in messages[start:end]]
        if ids == call_ids:  # the usual case: already in order
            continue
        where: dict[str, int] = {}  # a call id's position; -1 for one used twice
        for k, cid in enumerate(call_ids):
            where[cid] = -1 if cid in where else k
        seen = Counter(ids)
        slots = [k for k, rid in enumerate(ids) if rid and where.get(rid, -1) >= 0 and seen[rid] == 1]
        ordered = sorted(slots, key=lambda k: where[ids[k]])
        if ordered != slots:
            if out is messages:
                out = list(messages)
            for slot, k in zip(slots, ordered):
                out[start + slot] = messages[start + k]
    return out


# --------------------------------------------------------------------------- output events


@dataclass(frozen=True)
class TextEvent:
    text: str


@dataclass(frozen=True)
class ReasoningEvent:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """A fragment of the call's arguments *as a JSON text*; the fragments of one call
    concatenate to exactly the final ``arguments`` string."""

    index: int
    delta: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int


Event = Union[TextEvent, ReasoningEvent, ToolCallStart, ToolCallArgs, ToolCallEnd]


class StreamParser(ABC):
    """Turns raw model output, fed in arbitrary pieces, into events.

    Contract:
    * ``feed`` does work proportional to the new text (never re-scans what was fed).
    * Any split of the same output into pieces yields the same merged events.
    * Text is emitted as soon as it can no longer become part of a tool call; only a
      possible prefix of a call marker (or declared tool name) is held back.
    * Only declared tools become calls; anything else is text.  At a natural end
      (``finish()``) nothing is lost: held-back text that did not become a call is emitted
      as text.
    * At a cut (``finish(cut=True)``: the token limit ended the output) held-back text that
      could still have become a call marker or a call (a partial ``<tool_call>``, an opener
      whose name is still a prefix of a declared tool's, a JSON family's segment start that
      could still be a call) is dropped, never text.  A call whose name was closed is never
      dropped: ``ToolCallStart`` and its argument fragments stand, no ``ToolCallEnd``
      follows, and ``incomplete_call`` is True (the API returns it as a cut call with
      ``finish_reason="length"``).  Streamed and whole answers fold the same events, so
      they carry the same cut call.
    """

    def feed(self, text: str) -> list[Event]:
        """Consume the next piece of output."""
        out: list[Event] = []
        self._process(text, out)
        return out

    def _process(self, text: str, out: list[Event]) -> None:
        """Append the events of ``text`` to ``out`` (for parsers that keep the default ``feed``)."""
        raise NotImplementedError

    @abstractmethod
    def finish(self, cut: bool = False) -> list[Event]:
        """Flush at end of generation; ``cut``: the output was ended by the token limit."""

    _incomplete: bool = False

    @property
    def incomplete_call(self) -> bool:
        """True when output ended inside a tool call that was started but not closed, or
        (at a cut) inside the opener of a call that may have been becoming."""
        return self._incomplete


# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Constraint:
    """A decoding constraint handed to vLLM's structured outputs (exactly one field set).

    ``grammar`` is xgrammar EBNF; ``json`` a JSON schema (``response_format``).
    ``relaxed`` names the tools whose schema xgrammar could not compile, so their
    arguments are only constrained to a JSON object (the API counts them in a metric).
    """

    grammar: str | None = None
    json: dict[str, Any] | None = None
    relaxed: tuple[str, ...] = ()


# --------------------------------------------------------------------------- reasoning budget


@dataclass(frozen=True)
class ReasoningSwitch:
    """How a format's reasoning can be closed before the model closes it (a thinking budget).

    The server generates the reasoning with ``opener`` appended to the prompt (so the output
    starts inside it), and when the budget is spent it appends ``closer`` and generates the
    rest under ``answer``'s constraint (the one for what follows the reasoning).  ``opener``
    and ``closer`` are also fed to the format's parser, as if the model had written them.
    """

    opener: tuple[PromptPart, ...]
    """Parts appended to the prompt; empty when the generation prompt already opens reasoning."""
    closer: str
    """The control token that ends reasoning (``</think>``)."""
    answer: "ChatRequest"
    """The request whose :meth:`ChatFormat.constraint` applies after the reasoning."""
    reasoning: "Constraint | None" = None
    """What the request's constraint allows inside the reasoning (no call markers...), for
    the reasoning part; None when the request is unconstrained."""

    @property
    def opener_text(self) -> str:
        return "".join(p.token if isinstance(p, Control) else p for p in self.opener)


# --------------------------------------------------------------------------- call opener


@dataclass(frozen=True)
class CallOpener:
    """Where a format's ``auto`` answer can be split so that it need not wait for the tool set's
    grammar (:mod:`glmserve.api.early_start`).

    Up to the first ``opener`` the answer is generated under ``prelude``, which allows what the
    full constraint allows before a call (reasoning, text) and is the same for every tool set, so
    it is compiled once; from the opener on it continues under
    :meth:`ChatFormat.constraint_after_opener`, the tool set's.  Together they allow exactly what
    :meth:`ChatFormat.constraint` allows.
    """

    opener: str
    """The text that opens a call (``<tool_call>``): the prelude's generation stops on it."""
    prelude: Constraint


# --------------------------------------------------------------------------- format


class ChatFormat(ABC):
    """One model family's wire format."""

    name: ClassVar[str]
    """The ``--chat-format`` value."""

    stop: ClassVar[tuple[str, ...]] = ()
    """Strings that end a turn.  The engine looks each up in the tokenizer and stops on
    its id where it is a single token, else stops on the string."""

    skip_special_tokens: ClassVar[bool] = False
    """Whether detokenization drops special tokens.  Formats whose call markers are
    (non-special) added tokens keep them and strip them in the parser."""

    content_joiner: ClassVar[str] = "\n"
    """How the text parts of a message's content are joined (the GLM XML templates
    concatenate them; vLLM joins string-content templates' parts with newlines)."""

    @abstractmethod
    def render(self, request: ChatRequest) -> Prompt:
        """The prompt for a request (generation prompt included)."""

    @abstractmethod
    def parser(self, request: ChatRequest) -> StreamParser:
        """A fresh parser for one generation of this request."""

    def constraint(self, request: ChatRequest) -> Constraint | None:
        """The decoding constraint for the request's ``tool_choice``; None for free text.

        Raises :class:`glmserve.formats.grammar.UncompilableSchema` (a ``ValueError``) for
        a ``strict`` tool whose schema xgrammar cannot compile."""
        return None

    def call_opener(self, request: ChatRequest) -> CallOpener | None:
        """How the request's answer can start before its tool grammar is ready; None where it
        cannot be split (no tools, a ``tool_choice`` that forces a call from the start, a format
        whose calls have no opener)."""
        return None

    def constraint_after_opener(self, request: ChatRequest) -> Constraint | None:
        """The constraint for the rest of an answer whose call was just opened (see
        :class:`CallOpener`).  Only called where :meth:`call_opener` returned one."""
        return None

    def control_tokens(self) -> tuple[str, ...]:
        """Every string that is a control token of this format (for tests and token-id checks)."""
        return ()

    def reasoning_switch(self, request: ChatRequest) -> ReasoningSwitch | None:
        """How to close this request's reasoning early; None where the format has no
        reasoning, thinking is off, or the format cannot (the budget is then not enforced)."""
        return None


# --------------------------------------------------------------------------- helpers


def dumps(obj: Any) -> str:
    """Compact-ish JSON the way GLM templates write it: ``", "``/``": "`` separators,
    non-ASCII kept (``tojson(ensure_ascii=False)``)."""
    return json.dumps(obj, ensure_ascii=False)


def content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    return "" if content is None else str(content)


def referenced_definitions(message: dict[str, Any], tools: list[Tool], line: "Callable[[Tool], str]",
                           open_: str = "<tools>\n", close: str = "</tools>", joiner: str = "") -> str | None:
    """A tool result with ``tool_reference`` parts as text: its parts in order, each run of
    references as ``open_`` + ``line(tool)`` per referenced declared tool + ``close``, text
    parts as they are (joined by ``joiner``).  None for a result without references.

    This is GLM-5.1's template rule (``<tools>\n{json}\n</tools>``) generalised: the
    template writes only the definitions when the first part is a reference (and drops
    any text), only the text otherwise; glmserve keeps both, in order."""
    parts = message.get("content_parts")
    if not message.get("tool_references") or not parts:
        return None
    by_name = {t.name: t for t in tools}
    out: list[str] = []
    run: list[str] | None = None
    for part in parts:
        if part.get("type") == "tool_reference":
            if run is None:
                run = []
            tool = by_name.get(part.get("name", ""))
            if tool is not None:
                run.append(line(tool))
            continue
        if run is not None:
            out.append(open_ + "".join(run) + close)
            run = None
        out.append(str(part.get("text", "")))
    if run is not None:
        out.append(open_ + "".join(run) + close)
    return joiner.join(out)
