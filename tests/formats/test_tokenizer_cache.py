"""The prompt tokenizer's segment cache: bounded by the tokens it holds, filled only by prompts
that fit the context, and the same ids from several threads (the pipeline tokenizes long
prompts off the event loop).  The real SmolLM2 tokenizer, no vLLM."""

from __future__ import annotations

import threading
from functools import cache

import pytest

from glmserve.engine.tokenize import PromptTokenizer
from glmserve.formats.base import Control


@cache
def hf():
    from transformers import AutoTokenizer

    from glmserve.models import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def segment(i: int, words: int = 200) -> str:
    return " ".join(f"w{i}x{k}" for k in range(words))


def test_cache_is_bounded_by_tokens_not_entries() -> None:
    fresh = PromptTokenizer(hf(), cache_tokens=0)
    one = len(fresh.encode_plain(segment(0)))
    tok = PromptTokenizer(hf(), cache_tokens=5 * one)
    for i in range(40):
        parts = [Control("<|im_start|>"), segment(i), Control("<|im_end|>")]
        assert tok.encode_parts(parts) == fresh.encode_parts(parts)  # cached or not, the same ids
        assert tok.cached_tokens <= 5 * one
        assert tok.cached_tokens == sum(len(v) for v in tok._cache.values())
    assert 3 <= len(tok._cache) <= 5
    # the most recent segments are the ones kept, and hit
    hits = tok.cache_hits
    tok.encode_parts([segment(39)])
    assert tok.cache_hits == hits + 1
    # a segment larger than the whole budget is not cached at all
    small = PromptTokenizer(hf(), cache_tokens=one // 2)
    small.encode_parts([segment(1)])
    assert small.cached_tokens == 0 and not small._cache


def test_a_prompt_over_the_context_leaves_the_cache_unchanged() -> None:
    tok = PromptTokenizer(hf())
    kept = [segment(1)]
    n = len(tok.encode_parts(kept, cache_within=10_000))
    before = (dict(tok._cache), tok.cached_tokens)
    assert before[1] == n
    too_long = [segment(2), Control("<|im_end|>"), segment(3, 2000)]
    ids = tok.encode_parts(too_long, cache_within=1000)
    assert len(ids) > 1000
    assert (dict(tok._cache), tok.cached_tokens) == before
    tok.encode_parts(too_long)  # within no limit: cached
    assert tok.cached_tokens > before[1]


def test_threads_get_the_same_ids() -> None:
    tok = PromptTokenizer(hf())
    fresh = PromptTokenizer(hf(), cache_tokens=0)
    prompts = [[segment(i % 5, 300), Control("<|im_end|>"), "<|im_start|> is text", segment(100 + i)]
               for i in range(12)]
    want = [fresh.encode_parts(p) for p in prompts]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k, len(prompts), 3):
                got[i] = tok.encode_parts(prompts[i])
                tok.encode_raw("<|im_start|>raw")  # flips split_special_tokens on this thread's copy
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [got[i] for i in range(len(prompts))] == want


def _reference(hf, text: str, added: list[str]) -> list[int]:
    """What tokenizing plain text meant before: ``hf.encode`` per stretch, look-alikes spelled."""
    import re

    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
    ids: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        ids += hf.encode(text[pos:m.start()], add_special_tokens=False, split_special_tokens=True) if m.start() > pos else []
        for ch in m.group(0):
            ids += hf.encode(ch, add_special_tokens=False, split_special_tokens=True)
        pos = m.end()
    return ids + (hf.encode(text[pos:], add_special_tokens=False, split_special_tokens=True) if pos < len(text) else [])


@pytest.mark.parametrize("kind", [None, "glm4", "glm45", "glm53"])
def test_the_backend_copy_encodes_as_the_tokenizer_does(kind: str | None) -> None:
    from transformers import AutoTokenizer

    from tiny_models import build_tiny

    tok_hf = hf() if kind is None else AutoTokenizer.from_pretrained(str(build_tiny(kind)))
    added = list(tok_hf.get_added_vocab())
    tok = PromptTokenizer(tok_hf, cache_tokens=0)
    texts = ["hello", "  two  spaces\n\nand\ttabs ", "北京天气怎么样？ 🌤️ café naïve", "x" * 3000,
             "code: def f(x):\n    return x**2  # ok", "".join(added[:6]) + " between " + " ".join(added[-4:]),
             "<think>not a tag</think><tool_call>{\"a\": 1}</tool_call>", "a\u00a0b\u200bc\r\nd"]
    for text in texts:
        assert tok.encode_plain(text) == _reference(tok_hf, text, added), text
    assert tok_hf.encode("x", add_special_tokens=False) == tok.encode_raw("x")
