"""vLLM's own GLM-4.5 tool parser, reached here so that ``glmserve bench parser-cost`` can time it
next to glmserve's parsers without importing vLLM outside ``engine/``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _StubTokenizer:
    """Enough of a tokenizer for vLLM's parser engine: an empty vocabulary puts it in text mode."""

    def get_vocab(self) -> dict[str, int]:
        return {}


def glm45_tool_parser_path() -> str | None:
    """The import path of vLLM's GLM-4.5 tool parser (``--tool-call-parser glm45``), or None when
    this vLLM has none (or is not installed)."""
    try:
        from vllm.tool_parsers import glm47_moe_tool_parser  # noqa: F401

        return "vllm.tool_parsers.glm47_moe_tool_parser.Glm47MoeModelToolParser"
    except ImportError:
        pass
    try:
        from vllm.entrypoints.openai.tool_parsers import glm4_moe_tool_parser  # noqa: F401

        return "vllm.entrypoints.openai.tool_parsers.glm4_moe_tool_parser.Glm4MoeModelToolParser"
    except ImportError:
        return None


def glm45_tool_parser_factory(tools: list[dict[str, Any]]) -> tuple[Callable[[], Any], Any]:
    """A maker of fresh vLLM GLM-4.5 tool parsers for ``tools``, and the vLLM request they parse for
    (what ``extract_tool_calls_streaming`` takes as its last argument)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    try:
        from vllm.tool_parsers.glm47_moe_tool_parser import Glm47MoeModelToolParser as cls
    except ImportError:  # older layout
        from vllm.entrypoints.openai.tool_parsers.glm4_moe_tool_parser import Glm4MoeModelToolParser as cls
    req = ChatCompletionRequest(model="bench", messages=[{"role": "user", "content": "x"}], tools=tools,
                                tool_choice="auto")
    return (lambda: cls(_StubTokenizer(), req.tools)), req
