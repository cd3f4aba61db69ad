"""Long prompts: tokenized off the event loop, and a prompt the context check refuses leaves
the tokenizer's cache as it was.  The real pipeline over the real ``VLLMEngine.encode_parts``
and the real SmolLM2 tokenizer; the engine itself (vLLM) is not started."""

from __future__ import annotations

import asyncio
import threading
from functools import cache
from typing import Any

import pytest

from glmserve.api.errors import APIError
from glmserve.api.pipeline import OFFLOAD_MIN_CHARS, ChatPipeline, GenerationOptions
from glmserve.engine.tokenize import PromptTokenizer
from glmserve.engine.vllm_engine import VLLMEngine
from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest
from glmserve.metrics import Metrics


@cache
def hf() -> Any:
    from transformers import AutoTokenizer

    from glmserve.models import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


class Tokenizing(VLLMEngine):
    """VLLMEngine's own tokenization, without vLLM: records the thread each prompt is tokenized on."""

    def __init__(self, max_model_len: int) -> None:  # no super().__init__: no AsyncLLM
        self._tok = PromptTokenizer(hf())
        self.max_model_len = max_model_len
        self.model_name = self.model_path = "m"
        self.threads: list[int] = []

    def encode_parts(self, parts: list[Any]) -> list[int]:
        self.threads.append(threading.get_ident())
        return super().encode_parts(parts)


def chat(text: str) -> ChatRequest:
    return ChatRequest(messages=[{"role": "system", "content": text}, {"role": "user", "content": "hi"}])


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{k}" for k in range(n))


def test_long_prompts_are_tokenized_off_the_loop_short_ones_on_it() -> None:
    engine = Tokenizing(max_model_len=100_000)
    pipeline = ChatPipeline(engine, get_format("chatml"), Metrics())

    async def go() -> int:
        await pipeline.prepare(chat("short"), GenerationOptions(), "t-")
        long = words(OFFLOAD_MIN_CHARS // 4, "w")
        assert len(long) >= OFFLOAD_MIN_CHARS
        p = await pipeline.prepare(chat(long), GenerationOptions(), "t-")
        assert p.prompt_ids == PromptTokenizer(hf(), cache_tokens=0).encode_parts(pipeline.render(chat(long)).parts)
        return threading.get_ident()

    loop_thread = asyncio.run(go())
    assert engine.threads[0] == loop_thread and engine.threads[1] != loop_thread


def test_a_prompt_over_the_context_leaves_the_cache_unchanged() -> None:
    engine = Tokenizing(max_model_len=3000)
    tok = engine._tok
    pipeline = ChatPipeline(engine, get_format("chatml"), Metrics())
    asyncio.run(pipeline.prepare(chat(words(300, "a")), GenerationOptions(), "t-"))
    before = (dict(tok._cache), tok.cached_tokens)
    assert before[1] > 0  # a prompt that fits is cached
    with pytest.raises(APIError) as e:
        asyncio.run(pipeline.prepare(chat(words(5000, "b")), GenerationOptions(), "t-"))
    assert e.value.code == "context_length_exceeded"
    assert (dict(tok._cache), tok.cached_tokens) == before
