"""Chat-format detection from a model's config, tokenizer and template."""

from __future__ import annotations

import json

import pytest

from glmserve.formats import detect_format


def model_dir(tmp_path, arch: str, template: str = "", name: str = "m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": [arch]}))
    if template:
        (d / "chat_template.jinja").write_text(template)
    return d


@pytest.mark.parametrize("arch, template, vocab, name, want", [
    ("GlmForCausalLM", "", {"<|user|>"}, "glm-4-9b-chat-hf", "glm4"),
    ("ChatGLMForConditionalGeneration", "", {"<|user|>"}, "glm-4-9b-chat", "glm4"),
    ("Glm4ForCausalLM", "", {"<|user|>"}, "GLM-4-9B-0414", "glm4-0414"),
    ("Glm4ForCausalLM", "<|assistant|>\n<think>", {"<|user|>"}, "GLM-Z1-9B-0414", "glmz1"),
    ("Glm4MoeForCausalLM", "<tool_call>{{ tc.name }}\n<arg_key>", {"<|user|>", "<arg_key>"}, "GLM-4.5-Air", "glm45"),
    ("Glm4MoeForCausalLM", "", {"<|user|>", "<arg_key>"}, "GLM-4.7-Flash", "glm47"),
    ("LlamaForCausalLM", "<|im_start|>", {"<|im_start|>"}, "SmolLM2", "chatml"),
])
def test_detect_from_directory(tmp_path, arch, template, vocab, name, want):
    got, reason = detect_format(model_dir(tmp_path, arch, template, name), vocab)
    assert got == want and reason


def test_detect_from_hub_id_uses_engine_facts():
    assert detect_format("zai-org/GLM-4-32B-0414", {"<|user|>"}, ["Glm4ForCausalLM"])[0] == "glm4-0414"
    assert detect_format("zai-org/glm-4-9b-chat-hf", {"<|user|>"}, ["GlmForCausalLM"])[0] == "glm4"
    assert detect_format("some/model", set(), ["LlamaForCausalLM"], "<|im_start|>")[0] == "chatml"
