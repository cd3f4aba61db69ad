"""Chat-format detection from a model's config, tokenizer and template."""

from __future__ import annotations

import json
from pathlib import Path

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


# --------------------------------------------------------------------------- GLM-5.x

TEMPLATES = Path(__file__).parents[1] / "data" / "templates"


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.mark.parametrize("arch, template, name, want, says", [
    ("GlmMoeDsaForCausalLM", "GLM-5", "GLM-5", "glm47", "GLM-5, which renders exactly as GLM-4.7"),
    ("GlmMoeDsaForCausalLM", "GLM-5.1", "GLM-5.1", "glm51", "GLM-5.1"),
    ("GlmMoeDsaForCausalLM", "GLM-5.1", "some-checkpoint", "glm51", "defer_loading"),
    ("Glm5NextForConditionalGeneration", "GLM-5.3-Flash", "GLM-5.3-Flash", "glm53", "GLM-5.3"),
    # a GLM-4 architecture carrying the official template (the test suite's tiny models)
    ("Glm4ForCausalLM", "GLM-5.3-Flash", "tiny", "glm53", "Reasoning Effort"),
    ("Glm4ForCausalLM", "GLM-5.1", "tiny", "glm51", "tool_reference"),
    ("Glm4MoeForCausalLM", "GLM-4.7-Flash", "GLM-4.7-Flash", "glm47", "4.7"),
    # no template at hand: the name (then the architecture) decides
    ("GlmMoeDsaForCausalLM", None, "GLM-5.2-FP8", "glm51", "GLM-5.2: served as glm51"),
    ("GlmMoeDsaForCausalLM", None, "GLM-5.1", "glm51", "GLM-5.1"),
    ("GlmMoeDsaForCausalLM", None, "GLM-5", "glm47", "GLM-4.7"),
    ("GlmMoeDsaForCausalLM", None, "checkpoint", "glm47", "GLM-5"),
    ("Glm5NextForConditionalGeneration", None, "checkpoint", "glm53", "GLM-5.3-Flash"),
    ("Glm4MoeForCausalLM", None, "GLM-5.3", "glm53", "GLM-5.3"),
])
def test_detect_glm5(tmp_path, arch, template, name, want, says, caplog):
    got, reason = detect_format(model_dir(tmp_path, arch, _template(template) if template else "", name),
                                {"<|user|>", "<arg_key>"})
    assert got == want and says in reason, reason


def test_detect_glm5_from_hub_id_and_engine_template():
    got, reason = detect_format("zai-org/GLM-5.3-Flash", {"<arg_key>"}, ["Glm5NextForConditionalGeneration"],
                                _template("GLM-5.3-Flash"))
    assert got == "glm53" and "Glm5NextForConditionalGeneration" in reason
    assert detect_format("zai-org/GLM-5", {"<arg_key>"}, ["GlmMoeDsaForCausalLM"], _template("GLM-5"))[0] == "glm47"
    # GLM-4.x names are not GLM-5
    assert detect_format("zai-org/GLM-4.5-Air", {"<arg_key>"}, ["Glm4MoeForCausalLM"])[0] == "glm45"
