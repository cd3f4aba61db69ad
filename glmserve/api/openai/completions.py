"""``/v1/completions``: raw prompts, no chat format (an endpoint of :mod:`glmserve.api.runner`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from openai.types import Completion
from starlette.responses import Response

from glmserve.api import observe
from glmserve.api.errors import APIError, openai_stream_error
from glmserve.api.pipeline import output_budget, tokenize, too_long
from glmserve.api.runner import MAX_TOKENS_HEADER, Prelude, Services, chunk_encoder, generate_request, streams
from glmserve.api.schemas import CompletionRequest
from glmserve.engine.base import Engine, GenerateParams
from glmserve.formats.message import MessageBuilder
from glmserve.metrics import Metrics


@dataclass
class PreparedCompletion:
    request_id: str
    created: int
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: GenerateParams
    stream: bool
    include_usage: bool
    echo: bool
    budgets: list[int]
    """Each prompt's output budget (:func:`~glmserve.api.pipeline.output_budget`: a long prompt
    may leave less room than ``max_tokens``)."""
    max_tokens_asked: int
    completion_tokens: int = 0
    """Filled in while running (for the request log)."""

    @property
    def prompt_tokens(self) -> int:
        return sum(len(x) for x in self.prompts)

    @property
    def headers(self) -> dict[str, str]:
        return {MAX_TOKENS_HEADER: ",".join(map(str, self.budgets))}

    def params_for(self, k: int) -> GenerateParams:
        return replace(self.params, max_tokens=self.budgets[k])


class CompletionService:
    """The legacy Completions endpoint (see :class:`glmserve.api.runner.Endpoint`)."""

    name = "completion"

    def __init__(self, engine: Engine, metrics: Metrics, max_output_tokens: int | None = None,
                 served_name: Callable[[str | None], str] | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_output_tokens = max_output_tokens
        """The server-wide cap (``--max-output-tokens``)."""
        self.served_name = served_name
        """The served name a request's ``model`` means (``Services.check_model``: an alias is the
        first served name); None: the engine's name."""

    def log_fields(self, p: PreparedCompletion) -> tuple[int, dict[str, Any]]:
        granted = min(p.budgets)
        asked = {"max_tokens_asked": p.max_tokens_asked} if p.max_tokens_asked > granted else {}
        return p.prompt_tokens, {"completion_tokens": p.completion_tokens, "max_tokens": granted, **asked}

    stream_error = staticmethod(openai_stream_error)

    async def prepare(self, req: CompletionRequest, request: Request | None = None) -> PreparedCompletion:
        raw = req.prompt
        prompts: list[list[int]]
        texts: list[str]
        if isinstance(raw, str) or (raw and all(isinstance(x, str) for x in raw)):
            texts = [raw] if isinstance(raw, str) else list(raw)  # type: ignore[arg-type]
            if len(texts) > 64:
                raise APIError(400, "at most 64 prompts per request", param="prompt")
            for t in texts:  # one that cannot fit is refused before any is tokenized
                refused = too_long(self.engine, len(t), "prompt")
                if refused is not None:
                    raise refused
            # a long prompt is tokenized off the event loop, as a chat prompt is
            prompts = [await tokenize(len(t), self.engine.encode_raw, t) for t in texts]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts, texts = [list(raw)], [""]  # type: ignore[list-item]
        else:
            prompts, texts = [list(x) for x in raw], [""] * len(raw)  # type: ignore[union-attr]
        if len(prompts) > 64:
            raise APIError(400, "at most 64 prompts per request", param="prompt")
        vocab = getattr(self.engine, "vocab_size", None)
        for ids in prompts:
            bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of vocabulary"
                               + (f" (0 to {vocab - 1})" if vocab is not None else ""), param="prompt")
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise APIError(400, "prompt must not be empty", param="prompt")
        limit = self.engine.max_model_len
        if longest >= limit:
            raise APIError(400, f"the prompt is {longest} tokens, which does not fit this model's context of {limit} "
                                f"tokens", param="prompt", code="context_length_exceeded")
        asked = req.max_tokens or 16
        budgets = [output_budget(asked, self.max_output_tokens, limit - len(ids)) for ids in prompts]
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        params = GenerateParams(
            max_tokens=max(budgets),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop_list(),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            n=req.n,
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs,
        )
        prepared = PreparedCompletion(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.served_name(req.model) if self.served_name else self.engine.model_name,
            prompts=prompts,
            prompt_texts=texts,
            params=params,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            echo=req.echo,
            budgets=budgets,
            max_tokens_asked=asked,
        )
        obs = observe.current()
        if obs is not None:
            obs.text_prepared(prepared.request_id, prepared.model,
                              [t if t else f"[{len(ids)} token ids]" for t, ids in zip(texts, prompts)],
                              {"max_tokens": budgets[0] if len(budgets) == 1 else budgets, "temperature": params.temperature,
                               "top_p": params.top_p, "n": params.n, "seed": params.seed, "stop": list(params.stop)})
        return prepared

    async def complete(self, p: PreparedCompletion) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        obs = observe.current()
        for k, ids in enumerate(p.prompts):
            params = replace(p.params_for(k), final_only=True)  # nothing is sent before the end: no per-token deltas
            texts = [p.prompt_texts[k] if p.echo else "" for _ in range(p.params.n)]
            reasons: list[str | None] = [None] * p.params.n
            lps: list[dict[str, list[Any]] | None] = [None] * p.params.n
            rid = f"{p.request_id}-{k}"
            try:
                async for d in self.engine.generate(ids, params, rid):
                    if p.params.logprobs is not None:
                        lps[d.index] = _extend_logprobs(lps[d.index], d.logprobs or [], len(texts[d.index]))
                    texts[d.index] += d.text
                    completion_tokens += d.num_tokens
                    p.completion_tokens = completion_tokens
                    if obs is not None:
                        _observe(obs, k * p.params.n + d.index, d.text, d.num_tokens, d.finish_reason)
                    if d.finish_reason is not None:
                        reasons[d.index] = d.finish_reason
            finally:
                if any(r is None for r in reasons):  # cancelled (the client went away) or failed
                    await self.engine.abort(rid)
            for i in range(p.params.n):
                choices.append({"index": k * p.params.n + i, "text": texts[i], "logprobs": lps[i],
                                "finish_reason": reasons[i] if reasons[i] in ("stop", "length") else "stop"})
        prompt_tokens = sum(len(x) for x in p.prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.completion_tokens.inc(completion_tokens)
        return {
            "id": p.request_id, "object": "text_completion", "created": p.created, "model": p.model,
            "choices": choices, "system_fingerprint": None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    async def stream(self, p: PreparedCompletion) -> AsyncIterator[str]:
        completion_tokens = 0
        n = p.params.n
        obs = observe.current()

        encode = chunk_encoder({"id": p.request_id, "object": "text_completion", "created": p.created,
                                "model": p.model, "system_fingerprint": None}, p.include_usage)

        def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> str:
            return encode({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})

        for k, ids in enumerate(p.prompts):
            rid = f"{p.request_id}-{k}"
            done = 0
            try:
                if p.echo:  # the echo leaves with the engine's first output
                    yield Prelude("".join(chunk(k * n + i, p.prompt_texts[k], None) for i in range(n)))
                offsets = [len(p.prompt_texts[k]) if p.echo else 0] * n
                async for d in self.engine.generate(ids, p.params_for(k), rid):
                    completion_tokens += d.num_tokens
                    p.completion_tokens = completion_tokens
                    if obs is not None:
                        _observe(obs, k * n + d.index, d.text, d.num_tokens, d.finish_reason)
                    lp = None
                    if p.params.logprobs is not None and d.logprobs:
                        lp = _extend_logprobs(None, d.logprobs, offsets[d.index])
                    offsets[d.index] += len(d.text)
                    # an empty delta shows nothing, but sends the echo if it is still held
                    yield chunk(k * n + d.index, d.text, d.finish_reason, lp) if d.text or d.finish_reason or lp else ""
                    if d.finish_reason is not None:
                        done += 1
            finally:
                if done < n:
                    await self.engine.abort(rid)
        if p.include_usage:
            prompt_tokens = sum(len(x) for x in p.prompts)
            body = {"id": p.request_id, "object": "text_completion", "created": p.created, "model": p.model,
                    "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                             "total_tokens": prompt_tokens + completion_tokens}}
            yield "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"
        yield "data: [DONE]\n\n"


def router(services: Services) -> APIRouter:
    endpoint = CompletionService(services.engine, services.metrics, services.settings.max_output_tokens,
                                 services.check_model)
    r = APIRouter()

    @r.post("/v1/completions", responses=streams(Completion))
    async def text_completions(body: CompletionRequest, request: Request) -> Response:
        return await services.serve(endpoint, body, request)

    @r.post("/v1/completions/render")
    async def render(body: CompletionRequest, request: Request) -> list[dict[str, Any]]:
        """vLLM's render API for completions: one engine input per prompt, nothing generated
        (see :meth:`~glmserve.api.runner.Services.render`)."""
        p = await services.render(endpoint, body, request)
        return [generate_request(f"{p.request_id}-{k}", p.model, ids, replace(p.params, max_tokens=p.budgets[k]),
                                 p.stream)
                for k, ids in enumerate(p.prompts)]

    return r


def _observe(obs: observe.RequestObserver, index: int, text: str, num_tokens: int, finish: str | None) -> None:
    """One engine delta of a completion, told to the request's observer: raw text, no parser."""
    obs.output(index, text, [], num_tokens)
    if finish is not None:
        obs.finished(index, finish, MessageBuilder())


def _extend_logprobs(acc: dict[str, list[Any]] | None, new: list[Any], offset: int) -> dict[str, list[Any]]:
    """The legacy completions logprobs shape, extended by one delta's tokens."""
    out = acc or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for x in new:
        out["tokens"].append(x.token)
        out["token_logprobs"].append(x.logprob)
        out["top_logprobs"].append({t: lp for t, lp in x.top})
        out["text_offset"].append(offset)
        offset += len(x.token)
    return out
