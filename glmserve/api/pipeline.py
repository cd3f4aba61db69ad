"""The endpoint-independent path of a chat request: prompt, constraint, generation, fold.

Every chat-shaped endpoint (Chat Completions, Anthropic Messages, OpenAI Responses) maps
its request to a :class:`ChatRequest` plus :class:`GenerationOptions`, calls
:meth:`ChatPipeline.prepare`, and then consumes :meth:`ChatPipeline.run` (streamed answers)
or :meth:`ChatPipeline.complete` (whole answers).  ``run`` is the one per-choice fold: the
same parser events build the streamed deltas and the final message, so the two cannot
disagree, and tool-call checks, the argument hook and metrics happen once, here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import jsonschema
from referencing.exceptions import Unresolvable

from glmserve.api import observe
from glmserve.api.early_start import EarlyStart, GrammarWarmup, generate_until_call
from glmserve.api.errors import APIError
from glmserve.api.settings import ArgumentHook
from glmserve.api.thinking_budget import BudgetPlan, generate_with_budget
from glmserve.engine.base import Engine, GenerateParams, TokenLogprob
from glmserve.formats.base import (ChatFormat, ChatRequest, Constraint, Control, Event, Prompt, StreamParser, Tool,
                                   ToolCallEnd)
from glmserve.formats.freeform import GrammarError
from glmserve.formats.caches import thread_cache_misses
from glmserve.formats.grammar import ToolChoiceUnavailable, UncompilableSchema
from glmserve.formats.message import MessageBuilder
from glmserve.formats.schema_values import UnreadableSchema
from glmserve.metrics import Metrics, counted

log = logging.getLogger("glmserve.chat")

_ENGINE_TAKES_TOP_K = "top_k" in {f.name for f in fields(GenerateParams)}

OFFLOAD_MIN_CHARS = 8192
"""A prompt of at least this many characters of text (~2K tokens, ~5 ms to tokenize) is
tokenized on a worker thread, not on the event loop: a 60K-token prompt takes a quarter of a
second to tokenize, during which every other stream would stall.  Hugging Face's fast
tokenizers release the GIL while encoding, so the loop keeps serving meanwhile."""

_TOKENIZE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="glmserve-tokenize")
"""Shared by every app in the process: at most two long prompts are tokenized at once."""

_SCHEMA_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="glmserve-schema")
"""Where a request's tool and output schemas are checked and compiled (its own pool, so a
request with tools never waits behind the tokenization of someone's long prompt)."""

T = TypeVar("T")


async def _in(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool, call)


async def tokenize(chars: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, a tokenization of ``chars`` characters of text: on a worker thread from
    :data:`OFFLOAD_MIN_CHARS` on, so that the event loop keeps streaming other answers."""
    if chars < OFFLOAD_MIN_CHARS:
        return fn(*args)
    return await _in(_TOKENIZE_POOL, fn, *args)


async def schema_work(heavy: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, work on a request's tool or output schemas (checking them,
    compiling the decoding constraint): on a worker thread when ``heavy`` -- the request
    declares any -- so that a large tool set never stalls the event loop (building the
    constraint of a large new tool set is seconds of CPU; all of it is cached, so an agent's
    repeated tools cost little either way).  Pure-Python work there still takes the GIL,
    but the loop gets it back every few milliseconds (``sys.getswitchinterval``)."""
    if not heavy:
        return fn(*args, **kwargs)
    return await _in(_SCHEMA_POOL, fn, *args, **kwargs)


def too_long(engine: Engine, chars: int, param: str) -> APIError | None:
    """The 400 for text of ``chars`` characters that cannot fit the context whatever its
    tokens (:meth:`Engine.min_tokens`), found without tokenizing it: an 8 MiB prompt to a
    2K-token model is refused in microseconds instead of seconds of tokenizer time."""
    fewest = engine.min_tokens(chars)
    if fewest < engine.max_model_len:
        return None
    return APIError(400, f"the prompt is at least {fewest} tokens ({chars} characters), which does not fit this "
                         f"model's context of {engine.max_model_len} tokens", param=param,
                    code="context_length_exceeded")


def output_budget(asked: int | None, cap: int | None, room: int) -> int:
    """The output tokens a request is granted: what it asked for, at most the server's cap
    (``--max-output-tokens``) and the room its prompt leaves in the context; all that room when
    it asked for nothing.  vLLM's server does the same (``get_max_tokens``), and agents count on
    it: OpenCode, Kilo and Qwen Code ask for a fixed budget (32000) whatever the context, and a 400
    for asking more than a smaller context leaves sends them compacting and retrying, or exiting.  Whoever ran into the
    clamp sees it: ``finish_reason`` ``length`` when the budget runs out, the granted budget in
    the ``X-Glmserve-Max-Tokens`` header and the request log."""
    return min(v for v in (asked, cap, room) if v is not None)


@dataclass
class GenerationOptions:
    """Sampling and length settings, already read from the endpoint's request."""

    max_tokens: int | None = None
    """The output budget asked for; what is granted is :func:`output_budget`."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: int | None = None
    """None: no logprobs; k: each token's logprob and the k most likely alternatives."""
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None
    """Token id -> bias added to its logit (Chat Completions' ``logit_bias``)."""
    output_constraint: Constraint | None = None
    """The response format's constraint, used when no tool constraint applies."""
    schema_field: str = "parameters"
    """The schema's field in a tool object (``parameters``; ``input_schema`` on Messages): a 400 about a
    strict tool's schema names the declaring field (``Tool.param``) plus this."""
    thinking_budget: int | None = None
    """At most this many reasoning tokens: then the reasoning is closed and the answer
    generated under the same constraints (:mod:`glmserve.api.thinking_budget`).  Needs n=1;
    ignored where thinking is off, the format cannot close its reasoning, or it is at least the
    granted output (it cannot bind: one engine request, the output limit the only one)."""


@dataclass
class Prepared:
    """One chat request, ready to generate."""

    request_id: str
    created: int
    model: str
    chat: ChatRequest
    prompt_ids: list[int]
    params: GenerateParams
    validators: dict[str, Any] = field(default_factory=dict)
    completion_tokens: int = 0
    """Filled in while running (for usage and the request log)."""
    cached_tokens: int | None = None
    """Prompt tokens the engine served from its prefix cache, filled in while running (usage, the log)."""
    tool_names: list[str] = field(default_factory=list)
    """The finished calls' tool names, filled in while running (for the request log)."""
    invalid_calls: dict[str, str] = field(default_factory=dict)
    """Call id -> why its arguments break its tool's schema, as the backstop check found (while running)."""
    budget: BudgetPlan | None = None
    """How the thinking budget is enforced, when the request has one."""
    max_tokens_asked: int | None = None
    """The output budget the request asked for (None: none); ``params.max_tokens`` is the one granted."""
    early: EarlyStart | None = None
    """Where the answer is split so that it need not wait for its tool grammar
    (:mod:`glmserve.api.early_start`); ``params.constraint`` is then the prelude."""
    server_seconds: float = 0.0
    """glmserve's own time on this request so far (prepare, then output): the ``total`` phase."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class ChoiceUpdate:
    """What one engine delta did to one choice."""

    index: int
    events: list[Event]
    builder: MessageBuilder
    """The choice's message so far (every call, cut-off ones included, hook applied at each end)."""
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    """On the choice's last update: ``stop`` / ``length`` / ``tool_calls``."""
    num_tokens: int
    stop_sequence: str | None = None
    """On the last update: the request's stop string that ended the choice, if one did."""


@dataclass
class ChoiceResult:
    """One finished choice: its message (a call cut by the token limit included, as streamed:
    ``complete`` False, ``finish_reason`` ``length``), why it ended, its tokens."""

    index: int
    builder: MessageBuilder
    finish_reason: str = "stop"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0


class ChatPipeline:
    def __init__(self, engine: Engine, fmt: ChatFormat, metrics: Metrics, argument_hook: ArgumentHook | None = None,
                 max_output_tokens: int | None = None, early_start: bool = True) -> None:
        self.engine = engine
        self.max_output_tokens = max_output_tokens
        """The server-wide cap (``--max-output-tokens``): it wins over whatever a request asks."""
        self.fmt = fmt
        self.metrics = metrics
        self.argument_hook = argument_hook
        self.early_start = early_start and engine.compiles_grammars
        """Split ``auto`` answers at the call opener (:mod:`glmserve.api.early_start`); only an engine
        that compiles grammars needs it (``--wait-for-grammar`` turns it off)."""
        self.warmup = GrammarWarmup(engine, metrics.grammar_warmup_seconds.observe, metrics.grammar_warmups.set)
        self._stop_ids: list[int] = []
        self._stop_strs: list[str] = []
        for s in fmt.stop:
            tid = engine.token_id(s)
            if tid is not None:
                self._stop_ids.append(tid)
            else:
                self._stop_strs.append(s)

    # ------------------------------------------------------------------- prepare

    def render(self, chat: ChatRequest) -> Prompt:
        """The format's prompt; a history the format cannot write (an XML family's tool call
        whose arguments are not a JSON object...) is the client's error."""
        try:
            return self.fmt.render(chat)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None

    def constraint(self, chat: ChatRequest, schema_field: str = "parameters", count: bool = True,
                   build: Callable[[ChatRequest], Constraint | None] | None = None) -> Constraint | None:
        """The format's tool constraint (``build``: another of its constraints for the request, such
        as :meth:`ChatFormat.constraint_after_opener`).  A strict tool whose schema cannot be
        compiled is the client's error, named as the field that declared the tool (``Tool.param``)
        plus ``schema_field``.  ``count``: add its relaxed tools to the fallback metric (once per
        request, however many constraints the request builds)."""
        if not chat.tools or chat.tool_choice == "none":
            return None
        obs = observe.current()
        misses = thread_cache_misses() if obs is not None else 0  # the build below runs in this thread
        t0 = time.perf_counter()
        try:
            constraint = (build or self.fmt.constraint)(chat)
        except UncompilableSchema as exc:  # a strict tool whose schema xgrammar cannot enforce
            declared = next((t.param for t in chat.tools if t.name == exc.name and t.param), None)
            param = f"{declared}.{schema_field}" if declared else f"tools[{exc.index}].{schema_field}"
            raise APIError(400, f"{param}: {exc.reason}", param=param) from None
        except ToolChoiceUnavailable as exc:
            raise APIError(400, f"tool_choice: {exc}", param="tool_choice") from None
        except GrammarError as exc:  # a custom tool's grammar this family cannot carry (formats.freeform)
            declared = next((t.param for t in chat.tools if t.name == exc.tool and t.param), None)
            param = f"{declared}.format" if declared else "tools"
            raise APIError(400, f"{param}: {exc}", param=param) from None
        except UnreadableSchema as exc:  # a schema nothing can read (a dangling $ref)
            raise APIError(400, f"tools: cannot build a decoding constraint for these schemas: {exc}",
                           param="tools") from None
        except (ValueError, RuntimeError) as exc:  # schemas that passed every check: our fault, not the client's
            log.exception("building the %s tool constraint failed", self.fmt.name)
            raise APIError(500, f"the server failed to build a decoding constraint for these tools: "
                                f"{type(exc).__name__}", code="server_error") from None
        seconds = time.perf_counter() - t0
        self.metrics.constraint_seconds.observe(seconds)
        if count and constraint is not None and constraint.relaxed:  # non-strict tools decoded as any JSON object
            self.metrics.schema_fallbacks.inc(len(constraint.relaxed))
        if obs is not None and count:
            obs.constraint(chat, constraint, seconds, thread_cache_misses() == misses)
        return constraint

    async def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids; a long prompt is tokenized on a worker thread
        (:func:`tokenize`) so that the event loop keeps streaming other answers."""
        return await tokenize(_text_chars(prompt), self.engine.encode_parts, prompt.parts)

    async def prepare(self, chat: ChatRequest, opts: GenerationOptions, id_prefix: str) -> Prepared:
        """Render, tokenize, check the context, build the constraint and the engine's params.
        The request id is ``id_prefix`` followed by 32 hex digits."""
        t0 = time.perf_counter()
        prompt = self.render(chat)
        t1 = time.perf_counter()
        refused = too_long(self.engine, _text_chars(prompt), "messages")
        if refused is not None:
            raise refused
        prompt_ids = await self.encode(prompt)
        t2 = time.perf_counter()
        heavy = (chat.tools and chat.tool_choice != "none") or opts.output_constraint is not None
        prepared = await schema_work(heavy, self._prepared, chat, opts, id_prefix, prompt_ids, (t0, t1, t2))
        obs = observe.current()
        if obs is not None:
            obs.prepared(prepared, prompt)
        return prepared

    def _prepared(self, chat: ChatRequest, opts: GenerationOptions, id_prefix: str, prompt_ids: list[int],
                  times: tuple[float, float, float]) -> Prepared:
        """The rest of :meth:`prepare`, once the prompt is tokenized."""
        t0, t1, t2 = times
        limit = self.engine.max_model_len
        room = limit - len(prompt_ids)
        if room <= 0:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens, which does not fit this model's context of "
                                f"{limit} tokens", param="messages", code="context_length_exceeded")
        max_tokens = output_budget(opts.max_tokens, self.max_output_tokens, room)
        early = self._early_start(chat, opts, prompt_ids)
        if early is not None:
            constraint, plan = early
        else:
            constraint, plan = self.constraint(chat, opts.schema_field) or opts.output_constraint, None
        t3 = time.perf_counter()
        extra: dict[str, Any] = {}
        if opts.top_k is not None:
            if not _ENGINE_TAKES_TOP_K:
                raise APIError(400, "top_k is not supported by this server's engine", param="top_k")
            extra["top_k"] = opts.top_k
        params = GenerateParams(
            max_tokens=max_tokens,
            temperature=1.0 if opts.temperature is None else opts.temperature,
            top_p=1.0 if opts.top_p is None else opts.top_p,
            seed=opts.seed,
            # ignore_eos (benchmarks) must also run past the format's end-of-turn tokens
            stop=([] if opts.ignore_eos else list(self._stop_strs)) + list(opts.stop),
            stop_token_ids=[] if opts.ignore_eos else list(self._stop_ids),
            presence_penalty=opts.presence_penalty,
            frequency_penalty=opts.frequency_penalty,
            n=opts.n,
            logprobs=opts.logprobs,
            ignore_eos=opts.ignore_eos,
            logit_bias=opts.logit_bias,
            skip_special_tokens=self.fmt.skip_special_tokens,
            constraint=constraint,
            **extra,
        )
        validators = {t.name: jsonschema.validators.validator_for(t.parameters)(t.parameters)
                      for t in chat.tools if t.parameters is not None}
        prepared = Prepared(request_id=f"{id_prefix}{uuid.uuid4().hex}", created=int(time.time()),
                            model=self.engine.model_name, chat=chat, prompt_ids=prompt_ids, params=params,
                            validators=validators, budget=self._budget(chat, opts, max_tokens),
                            max_tokens_asked=opts.max_tokens, early=plan)
        prepared.server_seconds = time.perf_counter() - t0
        if counted():
            server = self.metrics.server_seconds
            server.labels("render").observe(t1 - t0)
            server.labels("tokenize").observe(t2 - t1)
            server.labels("constraint").observe(t3 - t2)
            server.labels("prepare").observe(prepared.server_seconds)
        return prepared

    def _early_start(self, chat: ChatRequest, opts: GenerationOptions,
                     prompt_ids: list[int]) -> tuple[Constraint, EarlyStart] | None:
        """The prelude and the split of an answer that need not wait for its tool grammar, or None
        where it must (one choice only; no thinking budget, which splits the answer itself; no
        strict tool nor custom tool with a grammar, whose schema or grammar must be found
        compilable, or the request refused, before the answer starts)."""
        if not self.early_start or opts.n != 1 or opts.thinking_budget is not None:
            return None
        if any(t.strict or (t.freeform is not None and t.freeform[0] != "text") for t in chat.tools_in_prompt):
            return None  # a strict schema or a custom tool's grammar: refused (400) before the answer, if it must be
        opener = self.fmt.call_opener(chat)
        if opener is None:
            return None
        after = self.fmt.constraint_after_opener
        probe = prompt_ids[:1]

        def build() -> Awaitable[Constraint | None]:
            return self.warmup.after_opener(lambda: self.constraint(chat, opts.schema_field, build=after), probe)

        return opener.prelude, EarlyStart(opener.opener, build, self.engine.computes_on_cpu,
                                          self.metrics.calls_continued.inc)

    async def warm_preludes(self) -> None:
        """Have the engine compile the format's preludes before the first request (every tool
        set's first turn starts under one of them)."""
        if not self.early_start:
            return
        tool = [Tool(name="f")]
        openers = [self.fmt.call_opener(ChatRequest(messages=[], tools=tool, enable_thinking=on)) for on in (True, False)]
        probe = self.engine.encode_parts(["a"])[:1]
        await self.warmup.prelude([o.prelude for o in openers if o is not None], probe)

    def _budget(self, chat: ChatRequest, opts: GenerationOptions, max_tokens: int) -> BudgetPlan | None:
        """How the thinking budget is enforced; None without one, or where the budget is at least
        the output the request is granted (``max_tokens`` after the clamps): the reasoning cannot
        outgrow the output, so the budget cannot bind, and enforcing it would only cost a second
        engine request each time the model closes its reasoning (Qwen Code sends budget and
        ``max_tokens`` both 32000)."""
        if opts.thinking_budget is None or opts.thinking_budget >= max_tokens:
            return None
        if opts.n != 1:
            raise APIError(400, "a thinking budget needs n=1", param="n")
        switch = self.fmt.reasoning_switch(chat)
        if switch is None:  # thinking off, or a format without a reasoning block to close
            return None
        answer = self.constraint(switch.answer, opts.schema_field, count=False) or opts.output_constraint
        return BudgetPlan(budget=opts.thinking_budget, opener_ids=self.engine.encode_parts(list(switch.opener)),
                          opener_text=switch.opener_text, closer=switch.closer,
                          closer_ids=self.engine.encode_parts([Control(switch.closer)]), answer_constraint=answer,
                          reasoning_constraint=switch.reasoning)

    # ------------------------------------------------------------------- run

    async def run(self, p: Prepared) -> AsyncIterator[ChoiceUpdate]:
        """The per-choice fold over the engine's deltas.  Aborts the engine request if the
        consumer stops before every choice finished (a disconnect, an error)."""
        n = p.params.n
        parsers = [self.fmt.parser(p.chat) for _ in range(n)]
        builders = [MessageBuilder() for _ in range(n)]
        raws = [""] * n if log.isEnabledFor(logging.DEBUG) else []
        obs = observe.current()
        finished = 0
        ended = [False] * n
        answered = False  # the engine's first delta came: the prompt was processed
        t0 = time.perf_counter()
        first = True
        output_seconds = 0.0  # our own time on the deltas: from receiving one to asking for the next
        if p.budget is not None:
            deltas = generate_with_budget(self.engine, p.prompt_ids, p.params, p.request_id, p.budget)
        elif p.early is not None:
            deltas = generate_until_call(self.engine, p.prompt_ids, p.params, p.request_id, p.early)
        else:
            deltas = self.engine.generate(p.prompt_ids, p.params, p.request_id)
        try:
            async for d in deltas:
                t_delta = time.perf_counter()
                answered = answered or bool(d.num_tokens) or d.finish_reason is not None  # not a budget's opener
                if first and d.num_tokens and not p.params.final_only:  # a whole answer has no first token to time
                    # from the start of preparing (render, tokenize) to the first token, which is
                    # when a stream's first chunk leaves: what a client timing it measures
                    self.metrics.ttft.observe(p.server_seconds + time.perf_counter() - t0)
                    first = False
                p.completion_tokens += d.num_tokens
                if d.cached_tokens is not None and p.cached_tokens is None:  # the first engine request's (a budget adds one)
                    p.cached_tokens = min(d.cached_tokens, p.prompt_tokens)
                parser, builder = parsers[d.index], builders[d.index]
                if raws:
                    raws[d.index] += d.text
                events = parser.feed(d.text)
                if d.finish_reason is not None:
                    events += parser.finish(cut=d.finish_reason == "length")
                builder.add(events)
                if obs is not None:
                    obs.output(d.index, d.text, events, d.num_tokens)
                if self.argument_hook is not None:
                    for ev in events:
                        if isinstance(ev, ToolCallEnd):
                            call = builder.calls[ev.index]
                            call.arguments = self._hooked(p, call.name, call.arguments)
                    if d.finish_reason is not None:
                        for call in builder.calls:
                            if not call.complete:  # the hook only sees finished calls, and streams
                                call.arguments = ""  # send hooked arguments whole at a call's end
                reason = None
                if d.finish_reason is not None:
                    finished += 1
                    ended[d.index] = True
                    reason = self._finish(p, d.finish_reason, parser, builder)
                    if obs is not None:
                        obs.finished(d.index, reason, builder)
                    if raws:
                        log.debug("request %s choice %d raw output: %r", p.request_id, d.index, raws[d.index])
                stop = d.stop_sequence if d.stop_sequence in p.params.stop and d.stop_sequence not in self._stop_strs else None
                yield ChoiceUpdate(d.index, events, builder, d.logprobs, reason, d.num_tokens, stop)
                output_seconds += time.perf_counter() - t_delta  # the consumer's shaping and sending included
            self.metrics.server_seconds.labels("output").observe(output_seconds)
            self.metrics.server_seconds.labels("total").observe(p.server_seconds + output_seconds)
            p.server_seconds += output_seconds
            self.metrics.e2e.observe(time.perf_counter() - t0)
        finally:
            # the tokens spent count, a cut or failed answer's too; its calls so far are its tools
            if answered:
                self.metrics.prompt_tokens.inc(len(p.prompt_ids))
            self.metrics.completion_tokens.inc(p.completion_tokens)
            if p.budget is not None or p.early is not None:
                await deltas.aclose()  # type: ignore[attr-defined]  # aborts its current engine request
            if finished < n:
                p.tool_names.extend(c.name for i, b in enumerate(builders) if not ended[i] for c in b.calls)
                await self.engine.abort(p.request_id)

    async def complete(self, p: Prepared) -> list[ChoiceResult]:
        """Every choice, run to the end.

        The engine hands each choice over whole (``final_only``) unless a thinking budget must
        watch the reasoning as it grows: the parsers take any split of the output alike.
        """
        if p.budget is None:
            p.params = replace(p.params, final_only=True)
        results = [ChoiceResult(i, MessageBuilder()) for i in range(p.params.n)]
        async for u in self.run(p):
            r = results[u.index]
            r.builder = u.builder
            r.logprobs.extend(u.logprobs or [])
            r.completion_tokens += u.num_tokens
            if u.finish_reason is not None:
                r.finish_reason = u.finish_reason
        return results

    # ------------------------------------------------------------------- checks

    def _hooked(self, p: Prepared, name: str, arguments: str) -> str:
        """The argument hook's rewrite of one call's arguments.  The hook is the server's
        code: raising, or returning anything but a JSON object's text, is a 500 (logged
        with the tool and the hook), never blamed on the request."""
        hook = self.argument_hook
        assert hook is not None
        what = f"request {p.request_id}: the argument hook {_name_of(hook)} on a call to {name!r}"
        try:
            out = hook(name, arguments)
        except Exception:
            log.exception("%s raised", what)
            raise APIError(500, f"the server's argument hook failed on a call to {name!r}", code="server_error") from None
        problem = None
        if not isinstance(out, str):
            problem = f"returned {type(out).__name__}, not a string"
        else:
            try:
                if not isinstance(json.loads(out), dict):
                    problem = "returned JSON that is not an object"
            except ValueError as exc:
                problem = f"returned text that is not JSON ({exc})"
        if problem is not None:
            log.error("%s %s", what, problem)
            raise APIError(500, f"the server's argument hook failed on a call to {name!r}: it {problem}",
                           code="server_error")
        return out

    def _finish(self, p: Prepared, engine_reason: str, parser: StreamParser, builder: MessageBuilder) -> str:
        """A choice's end: check and count its calls, and say why it ended."""
        for c in builder.calls:
            if c.complete:
                problem = self._check_call(p, c.name, c.arguments)
                if problem is not None:
                    p.invalid_calls[c.id] = problem
                self.metrics.tool_calls.inc()  # no name label: names come from requests
                p.tool_names.append(c.name)
        if engine_reason == "length" or parser.incomplete_call:
            return "length"
        if any(c.complete for c in builder.calls):
            return "tool_calls"
        return "stop"

    def _check_call(self, p: Prepared, name: str, arguments: str) -> str | None:
        """Backstop: the constraint should make every call valid; count those that are not, and
        say why (None: valid)."""
        try:
            args = json.loads(arguments)
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
            v = p.validators.get(name)
            if v is not None:
                v.validate(args)
            return None
        except (ValueError, jsonschema.ValidationError, Unresolvable) as exc:  # a dangling $ref is the schema's fault, not a crash
            self.metrics.tool_call_failures.inc()
            log.warning("request %s: call to %s has invalid arguments: %s", p.request_id, name, exc)
            if isinstance(exc, jsonschema.ValidationError):
                return f"{'/'.join(str(k) for k in exc.absolute_path) or '(top level)'}: {exc.message}"
            return str(exc)


def _text_chars(prompt: Prompt) -> int:
    return sum(len(p) for p in prompt.parts if isinstance(p, str))


def _name_of(fn: Any) -> str:
    """``module:qualname`` of a function (how ``--argument-hook`` names it)."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
