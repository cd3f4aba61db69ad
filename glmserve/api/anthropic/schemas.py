"""Request models for Anthropic's Messages API (``/v1/messages``).

Shaped after the ``anthropic`` package's ``MessageCreateParams`` types, which the tests use
as the reference.  Unknown fields (``metadata``, ``context_management``, ``container``,
``service_tier``, ``cache_control`` on any block...) are accepted and ignored, since
Claude Code and the SDK send new ones with each release.  Content blocks are a tagged
union on ``type``, so a malformed block is a 400 that names it.  ``tools`` stay plain
dicts here: tools of types only Anthropic's cloud runs are left out by the mapping, not
refused by validation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator

from glmserve.api.schemas import Loose, RequestBody




# --------------------------------------------------------------------------- content blocks


class TextBlock(Loose):
    type: Literal["text"]
    text: str


# Media sources, as the Messages API defines them: a ``source`` of another type, a ``media_type``
# outside its block's enum, or a field of the wrong type is a 400 naming the field.

ImageMediaType = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]


class Base64ImageSource(Loose):
    type: Literal["base64"]
    media_type: ImageMediaType
    data: str
    """Base64; checked (and measured) by :mod:`glmserve.api.media`, not decoded."""


class URLSource(Loose):
    type: Literal["url"]
    url: str = Field(min_length=1)


class FileSource(Loose):
    type: Literal["file"]
    file_id: str = Field(min_length=1)


class Base64PDFSource(Loose):
    type: Literal["base64"]
    media_type: Literal["application/pdf"]
    data: str


class PlainTextSource(Loose):
    type: Literal["text"]
    media_type: Literal["text/plain"]
    data: str


ImageSource = Annotated[Union[Base64ImageSource, URLSource, FileSource], Field(discriminator="type")]


class ImageBlock(Loose):
    type: Literal["image"]
    source: ImageSource


class ContentSource(Loose):
    """A document given as content blocks: text, and images."""

    type: Literal["content"]
    content: Union[str, list[Annotated[Union[TextBlock, ImageBlock], Field(discriminator="type")]]]


DocumentSource = Annotated[Union[Base64PDFSource, PlainTextSource, ContentSource, URLSource, FileSource],
                           Field(discriminator="type")]


class DocumentBlock(Loose):
    type: Literal["document"]
    source: DocumentSource
    title: str | None = None
    context: str | None = None


MediaBlock = Annotated[Union[ImageBlock, DocumentBlock], Field(discriminator="type")]
"""An ``image`` or ``document`` block (inside a ``tool_result`` too)."""


class ToolUseBlock(Loose):
    type: Literal["tool_use", "server_tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(Loose):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[dict[str, Any]], None] = None
    is_error: bool = False


class ThinkingBlock(Loose):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Loose):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[
    Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
    Field(discriminator="type"),
]


class InputMessage(Loose):
    role: Literal["user", "assistant", "system"]
    """``system`` is not in Anthropic's schema, but Claude Code sends such messages inside
    the array (instructions that arrive mid-conversation); they become system turns."""
    content: Union[str, list[ContentBlock]]


# --------------------------------------------------------------------------- options


class ToolChoiceAuto(Loose):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Loose):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Loose):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Loose):
    type: Literal["none"]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone], Field(discriminator="type")]


class ThinkingEnabled(Loose):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(Loose):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(Loose):
    type: Literal["disabled"]


Thinking = Annotated[Union[ThinkingEnabled, ThinkingAdaptive, ThinkingDisabled], Field(discriminator="type")]


class OutputConfig(Loose):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: dict[str, Any] | None = None


class MessagesBase(RequestBody):
    """Fields shared by ``/v1/messages`` and ``/v1/messages/count_tokens``."""

    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: Union[str, list[TextBlock], None] = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, t in enumerate(v or []):
            if not isinstance(t.get("name"), str) or not t["name"]:
                raise ValueError(f"tools[{i}].name: a tool needs a non-empty name")
            if t.get("type") in (None, "custom"):
                schema = t.get("input_schema")
                if not isinstance(schema, dict):
                    raise ValueError(f"tools[{i}].input_schema: a custom tool needs an input_schema object")
        return v


class MessagesRequest(MessagesBase):
    max_tokens: int = Field(ge=1)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        return v


class CountTokensRequest(MessagesBase):
    pass


# --------------------------------------------------------------------------- answers (for the OpenAPI document)


class _Answer(Loose):
    """What the server answers, as the OpenAPI document shows it (the fuzz test checks every
    answer against it); the answers themselves are built as plain JSON by :mod:`.shape`."""


class TextOut(_Answer):
    type: Literal["text"]
    text: str


class ThinkingOut(_Answer):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ToolUseOut(_Answer):
    type: Literal["tool_use"]
    id: str
    name: str
    input: Any


class MessageUsage(_Answer):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class MessageOut(_Answer):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[Annotated[Union[TextOut, ThinkingOut, ToolUseOut], Field(discriminator="type")]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: MessageUsage


class TokenCount(_Answer):
    input_tokens: int
