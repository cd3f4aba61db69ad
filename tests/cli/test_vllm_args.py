"""``glmserve.engine.vllm_args``: the serve command line becomes the engine settings glmserve relies on."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from glmserve.cli import _serve_parser  # noqa: E402
from glmserve.engine import vllm_args  # noqa: E402


def test_engine_args_carry_glmserve_defaults(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "x")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")  # restored (absent) after the test
    args = _serve_parser().parse_args(["some-model", "--max-model-len", "1024", "--chat-format", "glm45"])
    assert args.chat_format == "glm45" and args.model_pos == "some-model"
    ea = vllm_args.engine_args(args, "/models/x")
    assert ea.model == "/models/x" and ea.max_model_len == 1024
    so = ea.structured_outputs_config
    assert so.backend == "xgrammar" and so.disable_any_whitespace is True
    if vllm_args.cuda_available():
        return
    assert ea.enforce_eager is True
    assert ea.gpu_memory_utilization == vllm_args.CPU_MEMORY_UTILIZATION
    import os

    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == vllm_args.CPU_KVCACHE_GIB


def test_explicit_engine_settings_are_kept(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    args = _serve_parser().parse_args(["m", "--gpu-memory-utilization", "0.3", "--no-enforce-eager",
                                       "--structured-outputs-config.backend", "guidance"])
    ea = vllm_args.engine_args(args, "m")
    assert ea.gpu_memory_utilization == 0.3 and ea.enforce_eager is False
    assert ea.structured_outputs_config.backend == "guidance"
    import os

    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
