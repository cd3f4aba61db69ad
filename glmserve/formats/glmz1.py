"""GLM-Z1 (reasoning variant of GLM-4-0414).

Prompt as GLM-4-0414, but past reasoning is stripped from history (``reasoning_content``
is never rendered and any ``...</think>`` prefix of assistant text is cut) and the
generation prompt is ``<|assistant|>\\n<think>``.  Output therefore starts inside the
reasoning block: reasoning up to ``</think>``, then the answer or calls as GLM-4-0414
(whitespace right after ``</think>`` is dropped).
"""

from __future__ import annotations

from glmserve.formats.base import THINK_OPEN, ChatRequest, Control, Prompt
from glmserve.formats.glm4_0414 import GLM40414Format


class GLMZ1Format(GLM40414Format):
    name = "glmz1"
    strip_reasoning = True
    reasoning = True

    def _generation_prompt(self, p: Prompt, request: ChatRequest) -> None:
        if request.add_generation_prompt:
            p.add(Control("<|assistant|>"), "\n", Control(THINK_OPEN))

    def control_tokens(self) -> tuple[str, ...]:
        return super().control_tokens() + (THINK_OPEN,)
