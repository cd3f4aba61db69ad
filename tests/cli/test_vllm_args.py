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


def test_prefix_caching_is_on_and_can_be_turned_off():
    """Agents resend a 15-20K-token prefix each turn: the cache must be on (and reach the engine)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny_models import build_tiny

    model = str(build_tiny("glm4"))
    ea = vllm_args.engine_args(_serve_parser().parse_args([model, "--max-model-len", "1024"]), model)
    assert ea.enable_prefix_caching is True
    assert ea.create_engine_config().cache_config.enable_prefix_caching is True
    off = vllm_args.engine_args(_serve_parser().parse_args([model, "--no-enable-prefix-caching"]), model)
    assert off.enable_prefix_caching is False


def test_bench_gives_both_servers_prefix_caching():
    from glmserve.bench.serving import build_parser
    from glmserve.bench.servers import server_command

    args = build_parser().parse_args([])
    for which in ("glmserve", "vllm"):
        assert "--enable-prefix-caching" in server_command(which, args, "m", 1234)
