"""Long prompts: tokenized off the event loop (chat and completions alike), one that cannot fit
the context whatever its tokens refused without being tokenized, and a prompt the context check
refuses leaves the tokenizer's cache as it was.  The real pipeline and completions endpoint over
the real ``VLLMEngine`` tokenization and the real SmolLM2 tokenizer; the engine itself (vLLM)
is not started."""

from __future__ import annotations

import asyncio
import threading
from functools import cache
from typing import Any

import pytest

from glmserve.api.errors import APIError
from glmserve.api.openai.completions import CompletionService
from glmserve.api.pipeline import OFFLOAD_MIN_CHARS, ChatPipeline, GenerationOptions
from glmserve.api.schemas import CompletionRequest
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

    def encode_raw(self, text: str) -> list[int]:
        self.threads.append(threading.get_ident())
        return super().encode_raw(text)


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


def test_long_completion_prompts_are_tokenized_off_the_loop() -> None:
    engine = Tokenizing(max_model_len=100_000)
    service = CompletionService(engine, Metrics())
    long = words(OFFLOAD_MIN_CHARS // 4, "w") + "<|im_end|>"

    async def go() -> int:
        await service.prepare(CompletionRequest(prompt="short <|im_end|>"))
        p = await service.prepare(CompletionRequest(prompt=[long, "short"]))
        assert p.prompts[0] == list(hf().encode(long, add_special_tokens=False))  # special tokens recognised
        return threading.get_ident()

    loop_thread = asyncio.run(go())
    assert engine.threads[0] == loop_thread and engine.threads[1] != loop_thread and engine.threads[2] == loop_thread


def test_a_prompt_that_cannot_fit_is_refused_untokenized() -> None:
    """Text longer than the context times the most characters any token stands for cannot fit,
    whatever its tokens: the 400 comes without tokenizing it (seconds of CPU for 8 MiB)."""
    engine = Tokenizing(max_model_len=2048)
    huge = "word " * (200 << 10)  # 1 MiB
    assert engine.min_tokens(len(huge)) >= 2048
    pipeline = ChatPipeline(engine, get_format("chatml"), Metrics())
    for prepare in (lambda: pipeline.prepare(chat(huge), GenerationOptions(), "t-"),
                    lambda: CompletionService(engine, Metrics()).prepare(CompletionRequest(prompt=["hi", huge]))):
        with pytest.raises(APIError) as e:
            asyncio.run(prepare())
        assert e.value.code == "context_length_exceeded" and "at least" in e.value.message
    assert engine.threads == []  # nothing was tokenized
    # the bound is a true lower bound: text that tokenizes to few tokens per character is not refused by it
    dense = "\U0001f600" * 3000  # several tokens per character
    assert engine.min_tokens(len(dense)) <= len(engine.encode_raw(dense))
