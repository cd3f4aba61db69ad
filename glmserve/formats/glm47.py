"""GLM-4.7 (and 4.7-Flash, and GLM-5): compact XML tool calls, ``<think>`` reasoning.

GLM-5's official template renders exactly as GLM-4.7's (checked against both templates in
``tests/test_format_glm5.py``), so this family serves it.

The prompt is the official GLM-4.7 ``chat_template.jinja`` reproduced exactly (see
:func:`glmserve.formats.xmlcall.render_xml_prompt`): no newlines after role tokens or
inside calls, history turns before the last user message render as ``</think>`` unless
``clear_thinking`` is False, and the generation prompt is ``<|assistant|><think>``
(thinking on) or ``<|assistant|></think>`` (off; no ``/nothink`` in this template).

With thinking on the prompt ends with ``<think>``, so the output starts inside the
reasoning; the parser and the constraint both start there.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from glmserve.formats.xmlcall import XmlFormat, XmlStyle


class GLM47Format(XmlFormat):
    """GLM-4.7 (``<tool_call>name<arg_key>..`` without newlines)."""

    name: ClassVar[str] = "glm47"
    style: ClassVar[XmlStyle] = XmlStyle(newlines=False, nothink_suffix=False, honour_clear_thinking=True)
    thinking: ClassVar[Literal["lead", "open"]] = "open"
