"""vLLM's prefix-cache hits in every API's usage, on the real engine (tiny GLM-4.5, the session's
``glm45_server``): a prompt sent for the first time reports no cached tokens, the same prompt
again (streamed, then not) reports the tokens vLLM served from its prefix cache, in Chat
Completions' ``prompt_tokens_details``, Anthropic's ``cache_read_input_tokens`` and Responses'
``input_tokens_details``, and in the request log.
"""

from __future__ import annotations

import re
import uuid

import anthropic
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "tiny-glm45"


def _prompt() -> str:
    """Unique from its first words (no earlier request shares a cached block) and long
    enough to fill several KV-cache blocks."""
    return f"{uuid.uuid4().hex} " + " ".join(f"第{i}段：北京明天天气怎么样？" for i in range(60))


@pytest.fixture(scope="module")
def oai(glm45_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=glm45_server.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ant(glm45_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=glm45_server.url, api_key="none", max_retries=0, timeout=120)


def _cached_in_log(server, request_id: str) -> int:
    m = re.search(rf"{re.escape(request_id)} status=200 .*?cached_tokens=(\d+)", server.log())
    assert m is not None, server.log()[-3000:]
    return int(m.group(1))


def test_chat_completions_reports_cached_prompt_tokens(oai, glm45_server) -> None:
    msgs = [{"role": "user", "content": _prompt()}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    first = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    third = oai.chat.completions.create(**kw)
    assert first.usage.prompt_tokens > 300 and first.usage.prompt_tokens_details.cached_tokens == 0
    streamed = chunks[-1].usage
    assert 0 < streamed.prompt_tokens_details.cached_tokens <= streamed.prompt_tokens == first.usage.prompt_tokens
    assert 0 < third.usage.prompt_tokens_details.cached_tokens <= third.usage.prompt_tokens
    assert _cached_in_log(glm45_server, third.id) == third.usage.prompt_tokens_details.cached_tokens


def test_messages_reports_cache_read_input_tokens(ant, glm45_server) -> None:
    kw = dict(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": _prompt()}],
              thinking={"type": "disabled"}, extra_body={"temperature": 0})
    first = ant.messages.create(**kw)
    with ant.messages.stream(**kw) as st:
        streamed = st.get_final_message()
    third = ant.messages.create(**kw)
    assert first.usage.cache_read_input_tokens == 0 and first.usage.input_tokens > 300
    prompt = first.usage.input_tokens
    for m in (streamed, third):  # the prompt split into what the cache served and the rest
        assert m.usage.cache_read_input_tokens > 0
        assert m.usage.input_tokens + m.usage.cache_read_input_tokens == prompt
    assert _cached_in_log(glm45_server, third.id) == third.usage.cache_read_input_tokens


def test_responses_reports_cached_tokens(oai, glm45_server) -> None:
    # store=False: what Codex sends, and no shared response database is touched
    kw = dict(model=MODEL, input=_prompt(), max_output_tokens=4, temperature=0, reasoning={"effort": "none"}, store=False)
    first = oai.responses.create(**kw)
    done = [e for e in oai.responses.create(**kw, stream=True) if e.type in ("response.completed", "response.incomplete")]
    third = oai.responses.create(**kw)
    assert first.usage.input_tokens > 300 and first.usage.input_tokens_details.cached_tokens == 0
    assert 0 < done[0].response.usage.input_tokens_details.cached_tokens <= first.usage.input_tokens
    assert 0 < third.usage.input_tokens_details.cached_tokens <= third.usage.input_tokens
    assert _cached_in_log(glm45_server, third.id) == third.usage.input_tokens_details.cached_tokens
