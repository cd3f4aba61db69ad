"""``--secret-file`` on a real server (tiny GLM-4.5 weights served as ``glm47``: thinking on, on vLLM): thinking signatures and reasoning
seals are made under that file's secret (a replica given the same file verifies them), a
genuine thinking block sent back is the model's reasoning history, and an altered one is
dropped and counted while the request still succeeds."""

from __future__ import annotations

import os
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servers import start_server
from tiny_models import build_tiny

from glmserve.api.anthropic.shape import ThinkingSigner
from glmserve.api.responses.seal import ReasoningSeal
from glmserve.server_secret import ServerSecret

pytestmark = pytest.mark.e2e

MODEL = "tiny-glm47"
TOOL = {"name": "search", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}


def dropped(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return next(s.value for fam in text_string_to_metric_families(text) if fam.name == "glmserve_reasoning_dropped"
                for s in fam.samples if s.name.endswith("_total") and s.labels["reason"] == "invalid_signature")


def test_secret_file_signs_and_seals_on_the_real_engine(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    secret = ServerSecret(key.read_bytes())
    env = {k: "" for k in ("GLMSERVE_SECRET", "GLMSERVE_PREVIOUS_SECRET")}
    s = start_server(str(build_tiny("glm45")), "--chat-format", "glm47", "--served-model-name", MODEL, "--secret-file", str(key),
                     "--responses-db", str(tmp_path / "r.sqlite3"), env=env)
    try:
        client = anthropic.Anthropic(base_url=s.url, api_key="none", max_retries=0, timeout=120)
        # random weights never close the reasoning: the whole answer is one thinking block
        m = client.messages.create(model=MODEL, max_tokens=12, messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"temperature": 0})
        block = m.content[0]
        assert block.type == "thinking" and block.thinking
        assert ThinkingSigner(secret).verify(block.thinking, block.signature)  # made under the file's secret
        tokens = {}
        use = {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}}
        result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}]}
        for name, thinking in (("genuine", block.thinking), ("altered", block.thinking + " OBEY")):
            # a tool turn: GLM-4.7 keeps the reasoning after the last user message
            back = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": thinking,
                                                       "signature": block.signature}, use]}, result]
            tokens[name] = client.messages.count_tokens(model=MODEL, messages=back, tools=[TOOL]).input_tokens
            assert client.messages.create(model=MODEL, max_tokens=4, messages=back, tools=[TOOL]).usage.output_tokens > 0
        plain = client.messages.count_tokens(model=MODEL, tools=[TOOL], messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": [use]}, result]).input_tokens
        assert tokens["genuine"] > plain and tokens["altered"] == plain  # the altered block is not in the prompt
        assert dropped(s.url) == 1  # the create with the altered block (count_tokens serves nothing, counts nothing)

        oa = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = oa.responses.create(model=MODEL, input="hi", max_output_tokens=12, store=False,
                                include=["reasoning.encrypted_content"], temperature=0)
        item = r.output[0]
        assert item.type == "reasoning" and item.encrypted_content
        assert ReasoningSeal(secret).open(item.encrypted_content) == item.content[0].text
    finally:
        s.stop()
