"""Request models for the OpenAI endpoints.

Responses are plain dicts shaped like the ``openai`` package's types (the tests
validate them against those types); requests are pydantic models so that every
client mistake becomes a 400 naming the field.  Unknown top-level fields are
accepted and ignored, as OpenAI-compatible clients send extras freely.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def find_invalid_unicode(data: Any) -> str | None:
    """The path (``messages[0].content``) of the first string in ``data`` holding a lone
    UTF-16 surrogate (JSON allows ``"\\ud800"``; no tokenizer or UTF-8 encoder does), or None.
    Iterative, so a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            items = []
            for k, v in value.items():
                key = str(k)
                if _SURROGATE.search(key):
                    return (path or "body") + " (a key)"
                items.append((v, f"{path}.{key}" if path else key))
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None


NonEmpty = Annotated[str, Field(min_length=1)]
"""A string the request must not leave empty (the OpenAPI document says so)."""


class Loose(BaseModel):
    """Unknown fields are accepted (clients send vendor extensions) and kept."""

    model_config = ConfigDict(extra="allow")


class RequestBody(Loose):
    """A whole request body: text that is not valid Unicode is a 400 naming where it is."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = find_invalid_unicode(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode", "text is not valid Unicode (it holds a lone UTF-16 surrogate such as \\ud800)",
                {"param": where},
            )
        return data


class FunctionCallParam(Loose):
    name: str
    arguments: str = "{}"

    @field_validator("arguments", mode="before")
    @classmethod
    def _args_to_str(cls, v: Any) -> Any:
        # some clients send arguments as an object; the wire type is a JSON string
        import json

        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


class CustomCallParam(Loose):
    name: str
    input: str


class ToolCallParam(Loose):
    """An assistant turn's call: a function's (``function``) or a custom tool's (``type: "custom"``,
    ``custom: {name, input}``)."""

    id: str = ""
    type: Literal["function", "custom"] = "function"
    function: FunctionCallParam | None = None
    custom: CustomCallParam | None = None

    @model_validator(mode="after")
    def _body(self) -> "ToolCallParam":
        if self.type == "custom" and self.custom is None:
            raise ValueError("a custom tool call needs custom: {name, input}")
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool call needs function: {name, arguments}")
        return self


class ChatMessage(Loose):
    role: Role
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallParam | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    """vLLM's name for ``reasoning_content`` since its PR #33402 (vllm-router re-sends Chat Completions
    with the field renamed); either is accepted (``reasoning`` wins when both are sent, as in vLLM)."""


class FunctionDef(Loose):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Loose):
    type: Literal["function"] = "function"
    function: FunctionDef


class CustomDef(Loose):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    format: dict[str, Any] | None = None
    """``{"type": "text"}`` or ``{"type": "grammar", "grammar": {"syntax", "definition"}}``
    (read, with the path of a mistake, in :func:`glmserve.api.mapping.build_tools`)."""


class CustomToolDef(Loose):
    """A custom (freeform) tool: its input is one string (:mod:`glmserve.formats.freeform`)."""

    type: Literal["custom"]
    custom: CustomDef


def _tool_tag(v: Any) -> str:
    # bracketed tags stay out of an error's ``param`` (``tools[0].custom.name``)
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return "tool[custom]" if kind == "custom" else "tool[function]"


AnyToolDef = Annotated[Union[Annotated[ToolDef, Tag("tool[function]")], Annotated[CustomToolDef, Tag("tool[custom]")]],
                       Discriminator(_tool_tag)]


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(Loose):
    type: Literal["function"] = "function"
    function: NamedFunction


class NamedCustomChoice(Loose):
    type: Literal["custom"]
    custom: NamedFunction


class StreamOptions(Loose):
    include_usage: bool = False


class JSONSchemaFormat(Loose):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class SamplingFields(RequestBody):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[NonEmpty, Annotated[list[NonEmpty], Field(max_length=16)], None] = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as vLLM takes it
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not isinstance(s, str) or not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        elif isinstance(v, str) and not v:
            raise ValueError("stop sequence must not be empty")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[AnyToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedCustomChoice, NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None
    function_call: Union[Literal["none", "auto"], NamedFunction, None] = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    thinking_budget: int | None = Field(default=None, ge=1)
    """At most this many reasoning tokens (also ``chat_template_kwargs.thinking_budget``)."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> a bias from -100 to 100 added to its logit before sampling."""

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("at most 1024 token ids")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are from -100 to 100, not {bias}")
        return v

    # Field validators (not a model validator) so that the 400 names the field.
    @field_validator("functions")
    @classmethod
    def _not_both(cls, v: Any, info: ValidationInfo) -> Any:
        if v and info.data.get("tools"):
            raise ValueError("give either tools or the legacy functions, not both")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return v


class CompletionRequest(SamplingFields):
    prompt: Union[NonEmpty, Annotated[list[str], Field(min_length=1)], Annotated[list[int], Field(min_length=1)],
                  Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v
