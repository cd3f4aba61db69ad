"""vLLM in-process engine (``AsyncLLM``).  Command-line arguments and defaults: ``vllm_args``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from glmserve.engine.base import Delta, Engine, EngineRequestError, EngineUnavailable, GenerateParams, TokenLogprob
from glmserve.engine.tokenize import PromptTokenizer

log = logging.getLogger("glmserve.engine")


class VLLMEngine(Engine):
    compiles_grammars = True

    def __init__(self, engine_args: Any, served_model_name: str) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(engine_args)
        self.model_name = served_model_name
        self.model_path = engine_args.model
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self.computes_on_cpu = self._llm.vllm_config.device_config.device_type == "cpu"
        tok = self._llm.get_tokenizer()
        hf = getattr(tok, "tokenizer", tok)
        self._hf = hf
        # token ids a raw prompt may hold (as vLLM's own check: tokenizer or model, the larger)
        self.vocab_size = max(len(hf), int(self._llm.model_config.get_vocab_size()))
        self._tok = PromptTokenizer(hf)
        self._running: set[str] = set()
        self._dead: str | None = None

    # ---------------------------------------------------------------- tokenization

    def token_id(self, token: str) -> int | None:
        return self._tok.token_id(token)

    def vocab(self) -> set[str]:
        return set(self._hf.get_added_vocab().keys())

    def architectures(self) -> list[str]:
        return list(getattr(self._llm.model_config.hf_config, "architectures", None) or [])

    def chat_template(self) -> str | None:
        t = getattr(self._hf, "chat_template", None)
        return t if isinstance(t, str) else None

    def encode_parts(self, parts: list[Any]) -> list[int]:
        # a prompt that leaves no room to generate is refused by the context check: it must
        # not fill the tokenizer's cache
        return self._tok.encode_parts(parts, cache_within=self.max_model_len - 1)

    def encode_raw(self, text: str) -> list[int]:
        return self._tok.encode_raw(text)

    def min_tokens(self, chars: int) -> int:
        return self._tok.min_tokens(chars)

    # ---------------------------------------------------------------- generation

    @property
    def running(self) -> int:
        return len(self._running)

    def _sampling_params(self, p: GenerateParams) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        so = None
        c = p.constraint
        if c is not None:
            so = StructuredOutputsParams(json=c.json, grammar=c.grammar)
        return SamplingParams(
            n=p.n,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k or 0,
            seed=p.seed,
            stop=list(p.stop) or None,
            stop_token_ids=list(p.stop_token_ids) or None,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logprobs=p.logprobs,
            ignore_eos=p.ignore_eos,
            logit_bias=p.logit_bias,
            skip_special_tokens=p.skip_special_tokens,
            structured_outputs=so,
            output_kind=RequestOutputKind.FINAL_ONLY if p.final_only else RequestOutputKind.DELTA,
        )

    async def generate(self, prompt_ids: list[int], params: GenerateParams, request_id: str) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        await self.check_health()
        sp = self._sampling_params(params)
        self._running.add(request_id)
        try:
            async for out in self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, request_id):
                for c in out.outputs:
                    yield Delta(
                        index=c.index,
                        text=c.text,
                        num_tokens=len(c.token_ids),
                        finish_reason=c.finish_reason,
                        logprobs=self._logprobs(c) if params.logprobs is not None else None,
                        stop_sequence=c.stop_reason if isinstance(c.stop_reason, str) else None,
                        cached_tokens=out.num_cached_tokens,
                        token_ids=list(c.token_ids),
                    )
        except EngineDeadError as exc:
            self._dead = str(exc) or "engine died"
            raise EngineUnavailable(self._dead) from exc
        except VLLMClientError as exc:  # vLLM's verdict that the request is bad (4xx), not a server fault
            raise EngineRequestError(exc.args[0] if exc.args else str(exc), getattr(exc, "parameter", None)) from exc
        finally:
            self._running.discard(request_id)

    def _logprobs(self, c: Any) -> list[TokenLogprob] | None:
        if not c.logprobs:
            return None
        out = []
        for tid, entry in zip(c.token_ids, c.logprobs):
            chosen = entry.get(tid)
            top = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
            out.append(
                TokenLogprob(
                    token=chosen.decoded_token if chosen and chosen.decoded_token is not None else self._hf.decode([tid]),
                    logprob=float(chosen.logprob) if chosen else 0.0,
                    top=[(lp.decoded_token or "", float(lp.logprob)) for _, lp in top],
                )
            )
        return out

    async def abort(self, request_id: str) -> None:
        try:
            await self._llm.abort(request_id)
        except Exception:  # an engine that is already gone has nothing to abort
            log.debug("abort of %s failed", request_id, exc_info=True)

    async def check_health(self) -> None:
        if self._dead:
            raise EngineUnavailable(self._dead)
        if self._llm.errored:
            self._dead = str(self._llm.dead_error or "engine died")
            raise EngineUnavailable(self._dead)
        try:
            await self._llm.check_health()
        except Exception as exc:
            self._dead = str(exc) or "engine died"
            raise EngineUnavailable(self._dead) from exc

    async def shutdown(self) -> None:
        self._llm.shutdown()

