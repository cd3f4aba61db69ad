"""GLM-5.3 and GLM-5.3-Flash: GLM-5.1 plus a reasoning-effort line, always thinking.

The prompt is the official GLM-5.3-Flash ``chat_template.jinja`` reproduced exactly
(GLM-5.3 shares its tool-result and generation rules).  On top of GLM-5.1
(:mod:`glmserve.formats.glm51`):

* Every prompt starts ``[gMASK]<sop><|system|>Reasoning Effort: Low|High|Max``:
  ``reasoning_effort`` ``low`` / ``high`` (as sent, lower case), anything else (absent,
  ``medium``, ``none``...) ``Max``.
* Thinking cannot be turned off: the template ignores ``enable_thinking`` and the
  generation prompt is always ``<|assistant|><think>``, so the parser and the constraint
  always start inside the reasoning.
* ``clear_thinking`` defaults to False (past reasoning is kept); a history turn without
  reasoning (or whose reasoning is cleared) gets ``<think></think>``, never a lone ``</think>``.
* A run of tool results is reordered to follow the preceding assistant's ``tool_calls``
  ids when every result's ``tool_call_id`` matches exactly one call (and the ids are
  unique and non-empty); otherwise results keep their order.  glmserve puts every
  family's results in call order before rendering (:func:`~glmserve.formats.base.results_in_call_order`,
  which also moves the matched results of a partly matched run), so nothing here reorders.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from glmserve.formats.base import CallOpener, ChatRequest, Constraint, Prompt, StreamParser
from glmserve.formats.glm51 import GLM51Format, GLM51Renderer, split_reasoning
from glmserve.formats.xmlcall import THINK_CLOSE, THINK_OPEN, XmlRenderer, _ctl


def effort_line(reasoning_effort: str | None) -> str:
    return "Reasoning Effort: " + (reasoning_effort.capitalize() if reasoning_effort in ("low", "high") else "Max")


class GLM53Renderer(GLM51Renderer):
    """GLM-5.3-Flash's template: see the module docstring."""

    def preamble(self, p: Prompt, request: ChatRequest) -> None:
        super().preamble(p, request)
        p.add(_ctl("<|system|>"), effort_line(request.reasoning_effort))

    def assistant_head(self, p: Prompt, request: ChatRequest, messages: list[dict[str, Any]], i: int,
                       last_user: int) -> str:
        reasoning, content = split_reasoning(messages[i])
        if (request.clear_thinking is not True or i > last_user) and reasoning is not None:
            p.add(_ctl(THINK_OPEN), reasoning, _ctl(THINK_CLOSE))
        else:
            p.add(_ctl(THINK_OPEN), _ctl(THINK_CLOSE))
        return content

    def generation_prompt(self, p: Prompt, request: ChatRequest) -> None:
        p.add(_ctl("<|assistant|>"), _ctl(THINK_OPEN))


def _thinking_on(request: ChatRequest) -> ChatRequest:
    return request if request.enable_thinking else dataclasses.replace(request, enable_thinking=True)


class GLM53Format(GLM51Format):
    """GLM-5.3 / GLM-5.3-Flash (GLM-5.1 plus the effort line; thinking always on)."""

    name: ClassVar[str] = "glm53"
    renderer: ClassVar[type[XmlRenderer]] = GLM53Renderer

    def parser(self, request: ChatRequest) -> StreamParser:
        return super().parser(_thinking_on(request))

    def constraint(self, request: ChatRequest) -> Constraint | None:
        return super().constraint(_thinking_on(request))

    def call_opener(self, request: ChatRequest) -> CallOpener | None:
        return super().call_opener(_thinking_on(request))
