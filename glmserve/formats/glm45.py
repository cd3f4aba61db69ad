"""GLM-4.5 / GLM-4.6: XML tool calls with newlines, ``<think>`` reasoning.

The prompt is the official ``chat_template.jinja`` of GLM-4.5/4.6 reproduced exactly
(see :func:`glmserve.formats.xmlcall.render_xml_prompt`): role tokens are followed by a
newline, reasoning of history turns is kept only after the last user message (this
template has no ``clear_thinking`` switch, so that flag is ignored here), and with
thinking disabled ``/nothink`` is appended to user turns and the generation prompt is
``<|assistant|>\\n<think></think>``.

With thinking on the prompt ends at ``<|assistant|>``, so the output opens with
``<think>`` or ``\\n<think>``; the parser starts in its "lead" state.  The constraint uses
the same ``glm_xml`` call tags as GLM-4.7 (xgrammar's ``glm_xml`` style accepts the
newlines between elements) and an optional leading think block.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from glmserve.formats.xmlcall import XmlFormat, XmlStyle


class GLM45Format(XmlFormat):
    """GLM-4.5 / GLM-4.6 (``<tool_call>name\\n<arg_key>..`` with newlines)."""

    name: ClassVar[str] = "glm45"
    style: ClassVar[XmlStyle] = XmlStyle(newlines=True, nothink_suffix=True, honour_clear_thinking=False)
    thinking: ClassVar[Literal["lead", "open"]] = "lead"
