"""The request inspector (``glmserve serve --inspect N``): what the server did with each of the
last N requests, of any API and any client, kept in this process's memory and shown at
``GET /v1/inspector/requests`` (and in the playground, ``/ui``).

Why a tool call did or did not come out is answered by the steps of one request: the prompt
the server rendered (control tokens marked), the decoding constraint it built, the model's raw
text, what the parser made of it, the final calls and whether they fit their schemas, the
token counts, the timings and the error.  Each request's :class:`Entry` is the
:class:`~glmserve.api.observe.RequestObserver` of that request; :class:`InspectorMiddleware`
opens it (every POST under ``/v1``), attaches it to the request's context, names it in the
response's ``X-Request-Id`` header and records the status and any error body; the
:class:`Inspector` keeps the last ``max_entries`` within ``max_bytes``.

Nothing leaves the process: the entries live in memory only, until newer requests push them
out or the server stops.  The routes are under ``/v1``, behind the API key, and a key sees only
the requests made with it.  Off (the default), none of this is installed: the pipeline's
watched points then cost a ContextVar read each.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmserve.api import observe
from glmserve.api.errors import APIError
from glmserve.formats.base import (
    ChatRequest,
    Constraint,
    Control,
    Event,
    Prompt,
    ReasoningEvent,
    TextEvent,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)
from glmserve.formats.message import MessageBuilder

if TYPE_CHECKING:
    from glmserve.api.pipeline import Prepared

HEADER = "X-Request-Id"
"""Names a request's entry (``req_…``) in its response, as OpenAI's own header names its
requests: the ``openai`` SDK reads it into ``response._request_id``."""

PREFIX = "/v1/inspector"
UNWATCHED = (PREFIX, "/v1/ui/")
"""POSTs under ``/v1`` that are not requests to the model (the inspector's and the playground's own)."""

APIS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions", "/v1/messages": "messages",
        "/v1/responses": "responses"}

_ID_PREFIX = uuid.uuid4().hex[:12]
_IDS = itertools.count()
"""Entry ids: this process's random prefix and a counter (as many hex digits as OpenAI's ``req_…``)."""

ERROR_BODY_BYTES = 16 * 1024
"""Of an error response's body, what an entry keeps (the error itself is short)."""


def _clip(text: str, limit: int) -> tuple[str, int]:
    """``text`` with its middle left out past ``limit`` characters (the head holds the system
    prompt and tools, the tail the latest turns), and how many characters were left out."""
    if len(text) <= limit:
        return text, 0
    half = limit // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n[... {cut} characters left out ...]\n{text[-half:]}", cut


class Entry:
    """One request, as the pipeline reports it (a :class:`~glmserve.api.observe.RequestObserver`)."""

    def __init__(self, store: "Inspector", path: str, key: str | None, user_agent: str) -> None:
        self.store = store
        self.id = f"req_{_ID_PREFIX}{next(_IDS):012x}"
        self.path = path
        self.key = key
        self.user_agent = user_agent[:200]
        self.created = time.time()
        self.t0 = time.perf_counter()
        self.body = b""
        self.status: int | None = None
        self.error: dict[str, Any] | None = None
        self.request_id: str | None = None
        self.endpoint: str | None = None
        self.stream: bool | None = None
        self.model: str | None = None
        self.prompt: list[Any] | None = None
        self.prompt_chars = 0
        self.prompt_clipped = 0
        self.counts: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        self.constraint_info: dict[str, Any] | None = None
        self.run: "Prepared | None" = None
        """The pipeline's request, until it is over (its calls' verdicts are read from it)."""
        self.raw: dict[int, list[str]] = {}
        """Each choice's output pieces while it runs (then joined, in ``raw_text``)."""
        self.raw_text: dict[int, tuple[str, int]] = {}
        """Each choice's output once the request is over, clipped: ``(text, characters left out)``."""
        self.body_text: str | None = None
        self.body_clipped = 0
        self.deltas: dict[int, list[list[Event]]] = {}
        """Each choice's parser events, one list per delta, while it runs (then folded, in ``events``)."""
        self.events: dict[int, list[dict[str, Any]]] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.times: dict[str, float] = {}
        self.fields: dict[str, Any] = {}
        self.done = False
        self.bytes = 0

    # ------------------------------------------------------------------ what the pipeline reports

    def constraint(self, chat: ChatRequest, constraint: Constraint | None, seconds: float, cache_hit: bool) -> None:
        self.constraint_info = {"build_ms": round(seconds * 1000, 3), "cache_hit": cache_hit}

    def prepared(self, run: "Prepared", prompt: Prompt) -> None:
        now = time.perf_counter()
        self.times["queued"] = max(0.0, now - run.server_seconds - self.t0)
        self.times["prepared"] = now - self.t0
        self.request_id = run.request_id
        self.model = run.model
        self.prompt = prompt.parts
        self.run = run
        p = run.params
        self.params = {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "n": p.n,
                       "seed": p.seed, "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids),
                       "thinking_budget": run.budget.budget if run.budget is not None else None}
        self.constraint_info = {**_constraint_summary(run.chat, p.constraint), **(self.constraint_info or {})}
        self.store.add(self)

    def text_prepared(self, request_id: str, model: str, prompts: list[str], params: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.times["queued"] = 0.0
        self.times["prepared"] = now - self.t0
        self.request_id = request_id
        self.model = model
        self.prompt = list(prompts) if len(prompts) == 1 else [f"[prompt {k}]\n{p}\n\n" for k, p in enumerate(prompts)]
        self.params = params
        self.constraint_info = {"kind": "none (a completion: no template, no tools)"}
        self.store.add(self)

    def output(self, index: int, text: str, events: list[Event], num_tokens: int) -> None:
        # per token: keep references only; folding them is the end's work (or a view's)
        if num_tokens and "first_token" not in self.times:
            self.times["first_token"] = time.perf_counter() - self.t0
        self.raw.setdefault(index, []).append(text)
        if events:
            self.deltas.setdefault(index, []).append(events)

    def finished(self, index: int, reason: str, builder: MessageBuilder) -> None:
        calls = []
        invalid = self.run.invalid_calls if self.run is not None else {}
        for c in builder.calls:
            verdict = invalid.get(c.id) if c.complete else "cut by the token limit"
            calls.append({"id": c.id, "name": c.name, "arguments": c.arguments, "complete": c.complete,
                          "valid": verdict is None, "problem": verdict})
        self.choices[index] = {"finish_reason": reason, "calls": calls}

    def failed(self, status: int, message: str) -> None:
        self.error = {"status": status, "message": message, "in_band": True}

    def logged(self, endpoint: str, request_id: str, prompt_tokens: int, status: int, fields: dict[str, Any]) -> None:
        self.times["done"] = time.perf_counter() - self.t0
        self.endpoint = endpoint
        self.request_id = self.request_id or request_id
        self.stream = bool(fields.get("stream"))
        self.model = fields.get("model", self.model)
        self.counts = {"prompt_tokens": prompt_tokens, "cached_tokens": fields.get("cached_tokens"),
                       "completion_tokens": fields.get("completion_tokens")}
        self.fields = {k: v for k, v in fields.items()
                       if k not in ("stream", "cached_tokens", "completion_tokens", "model")}
        if status == 499:
            self.error = {"status": 499, "message": "the client went away before the answer was ready",
                          "in_band": False}

    # ------------------------------------------------------------------ what the middleware records

    def ended(self, status: int | None, error_body: bytes) -> None:
        """The response is over: keep what the routes say, let go of the rest, count the bytes."""
        self.done = True
        self.times.setdefault("done", time.perf_counter() - self.t0)
        if status is not None:
            self.status = status
        if self.status is not None and self.status >= 400 and self.error is None:
            self.error = {"status": self.status, "message": _error_message(error_body), "in_band": False}
        limit = self.store.field_chars
        prompt_bytes = 0
        if self.prompt is not None:
            for p in self.prompt:  # one pass: its length, and the memory its strings take
                text = p.token if isinstance(p, Control) else p
                self.prompt_chars += len(text)
                prompt_bytes += sys.getsizeof(text) + 8
            if self.prompt_chars > limit:
                self.prompt, _, self.prompt_clipped = _clip_parts(self.prompt, limit)
                prompt_bytes = sum(sys.getsizeof(v) + 100 for p in self.prompt for v in p.values())
        self.run = None
        body = self.body.decode("utf-8", "replace")
        self.body = b""
        self.body_text, self.body_clipped = _clip(body, limit)
        self.raw_text = {i: _clip("".join(pieces), limit) for i, pieces in self.raw.items()}
        self.raw = {}
        self.events = {i: _fold(deltas, limit) for i, deltas in self.deltas.items()}
        self.deltas = {}
        size = sys.getsizeof
        self.bytes = 2048 + prompt_bytes + size(self.body_text) \
            + sum(size(text) for text, _ in self.raw_text.values()) \
            + sum(200 + sum(size(v) for v in e.values()) for log in self.events.values() for e in log) \
            + sum(200 + size(c["arguments"]) for ch in self.choices.values() for c in ch["calls"])

    # ------------------------------------------------------------------ what the routes show

    def summary(self) -> dict[str, Any]:
        calls = [c["name"] for ch in self.choices.values() for c in ch["calls"]]
        reasons = [ch["finish_reason"] for _, ch in sorted(self.choices.items())]
        return {
            "id": self.id, "request_id": self.request_id, "api": APIS.get(self.path, self.path), "path": self.path,
            "created": round(self.created, 3), "status": self.status if self.done else "running",
            "stream": self.stream, "model": self.model, "user_agent": self.user_agent,
            "prompt_tokens": self.counts.get("prompt_tokens"), "completion_tokens": self.counts.get("completion_tokens"),
            "finish_reason": reasons[0] if len(reasons) == 1 else (reasons or None), "calls": calls,
            "error": self.error["message"] if self.error else None,
            "duration_ms": _ms(self.times.get("done")),
        }

    def view(self) -> dict[str, Any]:
        """Everything kept about the request (while it runs: what is known so far)."""
        raw = self.raw_text if self.done else {i: ("".join(pieces), 0) for i, pieces in self.raw.items()}
        body = self.body_text
        prompt = None
        if self.prompt is not None:
            parts, chars, cut = _clip_parts(self.prompt, self.store.field_chars)
            prompt = {"parts": parts, "chars": max(chars, self.prompt_chars), "left_out_chars": cut + self.prompt_clipped}
        events = self.events if self.done else {i: _fold(d, self.store.field_chars) for i, d in self.deltas.items()}
        choices = []
        for i in sorted(set(raw) | set(self.choices) | set(events)):
            text, cut = raw.get(i, ("", 0))
            choices.append({"index": i, "raw": text, "raw_left_out_chars": cut, "events": events.get(i, []),
                            **self.choices.get(i, {"finish_reason": None, "calls": []})})
        return {
            **self.summary(),
            "endpoint": self.endpoint,
            "request": {"body": body, "left_out_chars": self.body_clipped} if body is not None else None,
            "prompt": prompt,
            "tokens": self.counts or None,
            "params": self.params or None,
            "constraint": self.constraint_info,
            "choices": choices,
            "timings_ms": {k: _ms(self.times.get(k)) for k in ("queued", "prepared", "first_token", "done")},
            "log_fields": self.fields or None,
            "error": self.error,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _chars(parts: list[dict[str, str]]) -> int:
    return sum(len(p.get("text", p.get("control", ""))) for p in parts)


def _clip_parts(parts: list[Any], limit: int) -> tuple[list[dict[str, str]], int, int]:
    """A prompt's parts (the pipeline's, or already these) as JSON: ``{"text"}`` runs and
    ``{"control"}`` tokens, the middle left out past ``limit`` characters (``{"left_out"}``):
    ``(parts, characters, characters left out)``."""
    out: list[dict[str, str]] = []
    for p in parts:
        if isinstance(p, dict):
            out.append(p)
        elif isinstance(p, Control):
            out.append({"control": p.token})
        elif out and "text" in out[-1]:
            out[-1] = {"text": out[-1]["text"] + p}
        else:
            out.append({"text": p})
    total = _chars(out)
    if total <= limit:
        return out, total, 0
    head, tail, budget = [], [], limit // 2
    for p in out:  # the first half of the budget from the start...
        value = p.get("text", p.get("control", ""))
        if budget <= 0:
            break
        head.append(p if len(value) <= budget or "control" in p else {"text": value[:budget]})
        budget -= len(value)
    budget = limit // 2
    for p in reversed(out):  # ...the second from the end
        value = p.get("text", p.get("control", ""))
        if budget <= 0:
            break
        tail.append(p if len(value) <= budget or "control" in p else {"text": value[-budget:]})
        budget -= len(value)
    kept = _chars(head) + _chars(tail)
    return [*head, {"left_out": f"[... {total - kept} characters left out ...]"}, *reversed(tail)], total, total - kept


def _fold(deltas: list[list[Event]], limit: int) -> list[dict[str, Any]]:
    """One choice's parser events as JSON, adjacent text (reasoning, one call's arguments) merged."""
    log: list[list[Any]] = []  # [type, call index, pieces]
    for events in deltas:
        for ev in events:
            if isinstance(ev, (TextEvent, ReasoningEvent)):
                kind = "text" if isinstance(ev, TextEvent) else "reasoning"
                if not ev.text:
                    continue
                if log and log[-1][0] == kind:
                    log[-1][2].append(ev.text)
                else:
                    log.append([kind, None, [ev.text]])
            elif isinstance(ev, ToolCallArgs):
                if log and log[-1][0] == "call_arguments" and log[-1][1] == ev.index:
                    log[-1][2].append(ev.delta)
                else:
                    log.append(["call_arguments", ev.index, [ev.delta]])
            elif isinstance(ev, ToolCallStart):
                log.append(["call_start", ev.index, [ev.name]])
            elif isinstance(ev, ToolCallEnd):
                log.append(["call_end", ev.index, []])
    out = []
    for kind, index, pieces in log:
        if kind in ("text", "reasoning"):
            out.append({"type": kind, "text": _clip("".join(pieces), limit)[0]})
        elif kind == "call_start":
            out.append({"type": kind, "call": index, "name": pieces[0]})
        elif kind == "call_arguments":
            out.append({"type": kind, "call": index, "arguments": _clip("".join(pieces), limit)[0]})
        else:
            out.append({"type": kind, "call": index})
    return out


def _constraint_summary(chat: ChatRequest, constraint: Constraint | None) -> dict[str, Any]:
    """What decoding was held to: the mode, the tools it covers, the grammar's size."""
    choice = chat.tool_choice
    tools = [t.name for t in chat.tools_in_prompt] if chat.tools else []
    if choice not in ("none", "auto", "required"):
        mode, tools = "named", [choice]
    else:
        mode = choice if chat.tools else "no tools"
    out: dict[str, Any] = {"tool_choice": mode, "parallel_tool_calls": chat.parallel_tool_calls, "tools": tools}
    if constraint is None:
        out["kind"] = "none (free text)"
    elif constraint.grammar is not None:
        out.update(kind="grammar", grammar_chars=len(constraint.grammar), relaxed_tools=list(constraint.relaxed))
    else:
        out.update(kind="json_schema (response format)", schema_chars=len(json.dumps(constraint.json)))
    return out


def _error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI- or Anthropic-shaped error body, else the body."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
        message = obj["error"]["message"] if isinstance(obj.get("error"), dict) else obj.get("detail") or text
        return str(message)
    except (ValueError, AttributeError, KeyError, TypeError):
        return text or "(no body)"


class Inspector:
    """The last ``max_entries`` requests, within about ``max_bytes`` of memory: the oldest go first.

    Each kept text (the request body, the prompt, each choice's raw output and events) is
    clipped to a sixteenth of ``max_bytes`` characters, its middle left out, so that no one
    request takes more than about a quarter of it."""

    def __init__(self, max_entries: int, max_bytes: int = 64 << 20) -> None:
        if max_entries < 1:
            raise ValueError("the inspector keeps at least one request")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.field_chars = max(1024, max_bytes // 16)
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.by_request_id: dict[str, str] = {}
        self.bytes = 0

    def open(self, path: str, key: str | None, user_agent: str) -> Entry:
        return Entry(self, path, key, user_agent)

    def add(self, entry: Entry) -> None:
        """Keep ``entry`` (from when it is prepared, so a request in flight shows)."""
        if entry.id in self.entries:
            return
        self.entries[entry.id] = entry
        if entry.request_id:
            self.by_request_id[entry.request_id] = entry.id
        self._evict()

    def close(self, entry: Entry, status: int | None, error_body: bytes) -> None:
        """The request is over: seal its entry; one the pipeline never saw is kept only if it failed."""
        entry.ended(status, error_body)
        if entry.id not in self.entries:
            if entry.request_id is None and (entry.status is None or entry.status < 400):
                return  # not a model request (count_tokens, a stored response's retrieval...)
            self.add(entry)
        if entry.id in self.entries:
            if entry.request_id:
                self.by_request_id[entry.request_id] = entry.id
            self.bytes += entry.bytes
            self._evict()

    def _evict(self) -> None:
        while self.entries and (len(self.entries) > self.max_entries or
                                (self.bytes > self.max_bytes and len(self.entries) > 1)):
            _, old = self.entries.popitem(last=False)
            if old.done:
                self.bytes -= old.bytes
            if old.request_id is not None:
                self.by_request_id.pop(old.request_id, None)

    def get(self, ident: str, key: str | None) -> Entry | None:
        """The entry named by its own id or by the response's id (``chatcmpl-…``, ``msg_…``), if
        ``key`` made it."""
        entry = self.entries.get(ident) or self.entries.get(self.by_request_id.get(ident, ""))
        return entry if entry is not None and entry.key == key else None

    def list(self, key: str | None, limit: int) -> list[Entry]:
        return [e for e in reversed(self.entries.values()) if e.key == key][:limit]


class InspectorMiddleware:
    """Opens an :class:`Entry` for every POST under ``/v1`` and attaches it to the request's
    context (:func:`glmserve.api.observe.attach`); adds ``X-Request-Id`` to the response;
    records its status, the body of an error, and an unhandled failure.  Installed only with
    the inspector on, innermost (the API key and the body are known by then)."""

    def __init__(self, app: ASGIApp, inspector: Inspector) -> None:
        self.app = app
        self.inspector = inspector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith("/v1/") \
                or path.startswith(UNWATCHED):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        entry = self.inspector.open(path, scope.get("state", {}).get("api_key_id"),
                                    headers.get(b"user-agent", b"").decode("latin-1"))
        status: int | None = None
        error_body: list[bytes] = []
        size = 0

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not entry.body:
                entry.body = message.get("body", b"")  # the whole body: BodyLimitMiddleware read it
            return message

        async def watched_send(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (HEADER.lower().encode(), entry.id.encode())]}
            elif message["type"] == "http.response.body" and status is not None and status >= 400 \
                    and size < ERROR_BODY_BYTES:
                chunk = message.get("body", b"")[:ERROR_BODY_BYTES - size]
                error_body.append(chunk)
                size += len(chunk)
            await send(message)

        token = observe.attach(entry)
        try:
            await self.app(scope, watched_receive, watched_send)
        except BaseException as exc:
            if status is None:  # Starlette's outermost middleware answers it with a 500
                status = 500
                entry.error = {"status": 500, "message": f"internal error: {type(exc).__name__}", "in_band": False}
            raise
        finally:
            observe.detach(token)
            self.inspector.close(entry, status, b"".join(error_body))


def router(inspector: Inspector | None) -> APIRouter:
    """``GET /v1/inspector/requests`` (newest first) and ``GET /v1/inspector/requests/{id}``
    (an entry's id, or the response's own id); 404 while the inspector is off."""
    r = APIRouter()

    def on() -> Inspector:
        if inspector is None:
            raise APIError(404, "the request inspector is off: start the server with --inspect N to keep the last "
                                "N requests", code="inspector_off")
        return inspector

    @r.get(PREFIX + "/requests", include_in_schema=False)
    async def requests(request: Request, limit: int = 100) -> dict[str, Any]:
        store = on()
        key = request.state.api_key_id
        return {"object": "list", "max_entries": store.max_entries, "max_bytes": store.max_bytes,
                "data": [e.summary() for e in store.list(key, max(1, min(limit, store.max_entries)))]}

    @r.get(PREFIX + "/requests/{ident}", include_in_schema=False)
    async def entry(ident: str, request: Request) -> dict[str, Any]:
        found = on().get(ident, request.state.api_key_id)
        if found is None:
            raise APIError(404, f"no request {ident!r} is kept by the inspector (it keeps the last "
                                f"{on().max_entries}, of this API key)", param="id", code="not_found")
        return found.view()

    return r
