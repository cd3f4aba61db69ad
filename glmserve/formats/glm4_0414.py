"""GLM-4-0414 (GLM-4-9B/32B-0414): same turns as glm-4-9b-chat, tools from ``tools=``.

Layout: ``# 可用工具`` block (no preamble), then every system message, then the other
turns in order.  An assistant turn with metadata is ``<|assistant|>{meta} \\n{content}``;
whether the space is really there upstream is unverified, so it is :data:`META_SEP`.
"""

from __future__ import annotations

from glmserve.formats.base import ChatRequest, Control, Prompt
from glmserve.formats.jsoncall import GLMJsonFormat, history_entries, tool_block_body

META_SEP = " "
"""Between an assistant turn's metadata (function name) and its newline (unverified)."""


class GLM40414Format(GLMJsonFormat):
    name = "glm4-0414"
    strip_reasoning = False

    def render(self, request: ChatRequest) -> Prompt:
        p = Prompt()
        p.add(Control("[gMASK]"), Control("<sop>"))
        if request.listed_tools:
            p.add(Control("<|system|>"), "\n# 可用工具\n" + tool_block_body(request))
        entries = history_entries(request.messages, strip_reasoning=self.strip_reasoning, tools=request.tools_in_prompt)
        for role, _meta, content in entries:
            if role == "system":
                p.add(Control("<|system|>"), "\n" + content)
        for role, meta, content in entries:
            if role == "system":
                continue
            if meta:
                p.add(Control(f"<|{role}|>"), f"{meta}{META_SEP}\n{content}")
            else:
                p.add(Control(f"<|{role}|>"), "\n" + content)
        self._generation_prompt(p, request)
        return p

    def _generation_prompt(self, p: Prompt, request: ChatRequest) -> None:
        if request.add_generation_prompt:
            p.add(Control("<|assistant|>"))
