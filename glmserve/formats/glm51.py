"""GLM-5.1 (and GLM-5.2, served by this family): GLM-4.7's calls, coding-agent tools.

The prompt is the official GLM-5.1 ``chat_template.jinja`` reproduced exactly (checked
byte for byte and against the template itself, rendered by transformers, in the tests).
It differs from GLM-4.7 in four places, each a hook of :class:`~glmserve.formats.xmlcall.XmlRenderer`:

* **Tools** are printed as the bare function object (``{"name", "description",
  "parameters"}``, no ``type``/``function`` wrapper) with ``strict`` and
  ``defer_loading`` dropped; a tool with ``defer_loading: true`` (Claude Code's deferred
  tools) is left out of the system block.
* **Tool results**: one ``<|observation|>`` per run, each result in
  ``<tool_response>…</tool_response>``; a result whose content parts are
  ``tool_reference`` parts inlines the definitions of the tools they name (deferred ones
  included) as ``<tool_response><tools>\\n{…}\\n</tools></tool_response>``.  Where
  text parts come with the references (the template would then drop one or the other)
  both are kept, in order (:func:`~glmserve.formats.base.referenced_definitions`).
* **History think blocks** are written unstripped; an assistant turn after the last user
  message without reasoning gets ``<think></think>`` (thinking on), as does an earlier
  turn of a user turn that had reasoning somewhere, when ``clear_thinking`` is False.
* ``clear_thinking: false`` keeps earlier reasoning, as in GLM-4.7.

GLM-5.2's template could not be obtained verbatim; what is known of it (5.1's rules, an
``enable_thinking`` switch, a default ``Reasoning Effort: Max`` line) makes this family
the closest: its prompts differ from 5.2's by that effort line only.

Output is GLM-4.7's (compact XML calls, the prompt ends inside ``<think>``), so the
parser and the constraint are GLM-4.7's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from glmserve.formats.base import ChatRequest, Prompt, Tool, content_text, dumps, referenced_definitions
from glmserve.formats.xmlcall import (
    RESPONSE_CLOSE,
    RESPONSE_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    XmlFormat,
    XmlRenderer,
    XmlStyle,
    _ctl,
)

_HIDDEN_KEYS = ("defer_loading", "strict")


def tool_json(tool: Tool) -> str:
    """The template's ``tool_to_json``: the function object's keys in the client's order,
    ``strict`` and ``defer_loading`` left out."""
    return "{" + ", ".join(f'"{k}": {dumps(v)}' for k, v in tool.function.items() if k not in _HIDDEN_KEYS) + "}"


def split_reasoning(message: dict[str, Any]) -> tuple[str | None, str]:
    """``(reasoning, content)`` as the GLM-5.x templates derive them (nothing stripped);
    reasoning None when the turn has none."""
    content = content_text(message)
    rc = message.get("reasoning_content")
    if isinstance(rc, str):
        return rc, content
    if THINK_CLOSE in content:
        return content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1], content.split(THINK_CLOSE)[-1]
    return None, content


class GLM51Renderer(XmlRenderer):
    """GLM-5.1's template: see the module docstring."""

    def tool_block_shown(self, request: ChatRequest) -> bool:
        return bool(request.tools) and request.tool_choice != "none"  # `if tools`, deferred ones too

    def tool_line(self, tool: Tool) -> str | None:
        return None if tool.function.get("defer_loading") else tool_json(tool)

    def assistant_head(self, p: Prompt, request: ChatRequest, messages: list[dict[str, Any]], i: int,
                       last_user: int) -> str:
        reasoning, content = split_reasoning(messages[i])
        if reasoning is None:
            if i > last_user and request.enable_thinking:
                reasoning = ""
            elif i < last_user and _turn_had_reasoning(messages, i):
                reasoning = ""
        if (request.clear_thinking is False or i > last_user) and reasoning is not None:
            p.add(_ctl(THINK_OPEN), reasoning, _ctl(THINK_CLOSE))
        else:
            p.add(_ctl(THINK_CLOSE))
        return content

    def tool_results(self, p: Prompt, request: ChatRequest, messages: list[dict[str, Any]], start: int,
                     end: int) -> None:
        p.add(_ctl("<|observation|>"))
        for m in messages[start:end]:
            self.tool_response(p, request, m)

    def tool_response(self, p: Prompt, request: ChatRequest, message: dict[str, Any]) -> None:
        body = referenced_definitions(message, request.tools_in_prompt, lambda t: tool_json(t) + "\n")
        p.add(_ctl(RESPONSE_OPEN), content_text(message) if body is None else body, _ctl(RESPONSE_CLOSE))


def _turn_had_reasoning(messages: list[dict[str, Any]], i: int) -> bool:
    """Whether the user turn that message ``i`` belongs to has an assistant message with
    ``reasoning_content`` (the template's ``has_thinking``); False before any user turn."""
    user = max((k for k in range(i) if messages[k].get("role") == "user"), default=-1)
    if user < 0:
        return False
    for m in messages[user + 1:]:
        if m.get("role") == "user":
            return False
        if m.get("role") == "assistant" and isinstance(m.get("reasoning_content"), str):
            return True
    return False


class GLM51Format(XmlFormat):
    """GLM-5.1 / GLM-5.2 (GLM-4.7's compact XML calls; deferred tools, tool references)."""

    name: ClassVar[str] = "glm51"
    style: ClassVar[XmlStyle] = XmlStyle(newlines=False, nothink_suffix=False, honour_clear_thinking=True)
    thinking: ClassVar[Literal["lead", "open"]] = "open"
    renderer: ClassVar[type[XmlRenderer]] = GLM51Renderer
