"""Request models for ``POST /v1/responses`` (the OpenAI Responses API).

Pydantic models, so a client mistake becomes a 400 naming the field (``input[2].call_id``).
Unknown fields are accepted and ignored, as Responses clients (Codex CLI, the Agents SDK)
send many that a self-hosted model has no use for (``client_metadata``, ``prompt_cache_key``...).
Tools and content parts stay plain dicts here: which of them glmserve can serve is decided,
with the path of the offending one, in :mod:`glmserve.api.responses.mapping`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from glmserve.api.schemas import Loose, RequestBody




class MessageItem(Loose):
    """``{"role", "content"}`` (EasyInputMessage) or ``{"type": "message", ...}``."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[dict[str, Any]]]
    id: str | None = None


class FunctionCallItem(Loose):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = "{}"
    namespace: str | None = None
    id: str | None = None

    @field_validator("arguments", mode="before")
    @classmethod
    def _args_to_str(cls, v: Any) -> Any:
        # the wire type is a JSON string; some clients send the object itself
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


class FunctionCallOutputItem(Loose):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Union[str, list[dict[str, Any]]]
    id: str | None = None


class CustomToolCallItem(Loose):
    """A custom (freeform) tool's call: its input is one string."""

    type: Literal["custom_tool_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: str = ""
    namespace: str | None = None
    id: str | None = None


class CustomToolCallOutputItem(Loose):
    type: Literal["custom_tool_call_output"]
    call_id: str = Field(min_length=1)
    output: Union[str, list[dict[str, Any]]]
    id: str | None = None


class ReasoningItem(Loose):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None


class ItemReference(Loose):
    type: Literal["item_reference"]
    id: str


class OtherItem(Loose):
    """An item type glmserve does not run (computer_call, shell_call...): refused in mapping."""

    type: str


_ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem,
          "custom_tool_call": CustomToolCallItem, "custom_tool_call_output": CustomToolCallOutputItem,
          "reasoning": ReasoningItem, "item_reference": ItemReference}


def _tag(kind: str) -> str:
    # Tags appear in validation error locations; the bracketed form is one the error
    # handler leaves out of ``param`` (``input[2].call_id``, not ``input[2].function_call.call_id``).
    return f"item[{kind}]"


def _item_tag(v: Any) -> str:
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", "message")
    return _tag(kind if isinstance(kind, str) and kind in _ITEMS else "other")


_BRANCHES = tuple(Annotated[cls, Tag(_tag(kind))] for kind, cls in [*_ITEMS.items(), ("other", OtherItem)])
InputItem = Annotated[Union[_BRANCHES], Discriminator(_item_tag)]  # type: ignore[valid-type]


class ReasoningParam(Loose):
    effort: str | None = None
    summary: str | None = None


class TextFormat(Loose):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextParam(Loose):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: list[InputItem] = Field(default_factory=list)
    """A string ``input`` arrives here as one user message (see ``_string_input``)."""
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    reasoning: ReasoningParam | None = None
    text: TextParam | None = None
    include: list[str] | None = None
    store: bool = True
    stream: bool = False
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    client_metadata: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _string_input(cls, data: Any) -> Any:
        # ``input: "hi"`` means one user message; turning it into that item keeps the
        # validation errors of item lists about items, not about "should be a string".
        if isinstance(data, dict) and isinstance(data.get("input"), str):
            data = {**data, "input": [{"type": "message", "role": "user", "content": data["input"]}]}
        return data

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v

    @property
    def include_encrypted_reasoning(self) -> bool:
        return "reasoning.encrypted_content" in (self.include or [])


# --------------------------------------------------------------------------- answers (for the OpenAPI document)


class _Answer(Loose):
    """What the server answers, as the OpenAPI document shows it (the fuzz test checks every
    answer against it); the answers themselves are built as plain JSON by :mod:`.shape`."""


class OutputText(_Answer):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class ReasoningText(_Answer):
    type: Literal["reasoning_text"]
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(_Answer):
    type: Literal["message"]
    id: str
    role: Literal["assistant"]
    status: ItemStatus
    content: list[OutputText]


class OutputReasoning(_Answer):
    type: Literal["reasoning"]
    id: str
    summary: list[Any]
    content: list[ReasoningText]
    encrypted_content: str | None = None


class OutputFunctionCall(_Answer):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus
    namespace: str | None = None


class ResponseUsage(_Answer):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseOut(_Answer):
    """A response object (``POST /v1/responses``, ``GET /v1/responses/{id}``).  The fields a
    request sets are echoed as it sent them (``tools``, ``tool_choice``, ``text``, ``metadata``...)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[Annotated[Union[OutputMessage, OutputReasoning, OutputFunctionCall], Field(discriminator="type")]]
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    usage: ResponseUsage | None
    previous_response_id: str | None
    store: bool
    parallel_tool_calls: bool
    tools: list[Any]
    tool_choice: Any


class ResponseDeleted(_Answer):
    id: str
    object: Literal["response.deleted"]
    deleted: bool
