"""glm-4-9b-chat (and -1m): ``<|role|>{metadata}\\n{content}`` turns, tools in a system block.

Mirrors the official template: the tools block (ChatGLM preamble + ``# 可用工具`` + one
indented JSON per function) comes first, empty messages are dropped, an assistant tool
call is a turn whose metadata is the function name and whose content is the arguments.
"""

from __future__ import annotations

from glmserve.formats.base import ChatRequest, Control, Prompt
from glmserve.formats.jsoncall import GLMJsonFormat, history_entries, tool_block_body

PREAMBLE = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)


class GLM4Format(GLMJsonFormat):
    name = "glm4"

    def render(self, request: ChatRequest) -> Prompt:
        p = Prompt()
        p.add(Control("[gMASK]"), Control("<sop>"))
        if request.listed_tools:
            p.add(Control("<|system|>"), "\n" + PREAMBLE + "\n\n# 可用工具" + tool_block_body(request))
        for role, meta, content in history_entries(request.messages, tools=request.tools_in_prompt):
            if not content:  # the official template drops empty messages
                continue
            p.add(Control(f"<|{role}|>"), f"{meta}\n{content}")
        if request.add_generation_prompt:
            p.add(Control("<|assistant|>"))
        return p
