"""The server's knobs (set from ``glmserve serve`` flags)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from glmserve.api.mapping import Limits

ArgumentHook = Callable[[str, str], str]
"""``hook(tool_name, arguments_json) -> arguments_json``: sees each finished call."""


@dataclass
class Settings:
    api_keys: list[str] = field(default_factory=list)
    max_concurrent_requests: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int | None = None
    """``--max-messages``: a cap below what the context bounds (None: no count cap)."""
    max_tools: int | None = None
    """``--max-tools``: a cap below what the context and the body size bound (None: no count cap)."""
    max_schema_bytes: int = 256 * 1024
    max_schema_depth: int = 64
    """Nesting (objects and arrays) allowed in a tool or response_format schema."""
    served_model_names: list[str] = field(default_factory=list)
    argument_hook: ArgumentHook | None = None
    json_logs: bool = False
    max_output_tokens: int | None = None
    """Server-wide cap on every request's output tokens (``--max-output-tokens``; None: no cap)."""
    responses_db: str | None = None
    """The SQLite file of stored Responses (``--responses-db``; None: ``<glmserve cache>/responses.sqlite3``)."""
    image_input: str = "note"
    """``note``: image / video / audio parts become a text note (:mod:`glmserve.api.media`);
    ``reject``: they are a 400 (``--image-input``)."""
    model_aliases: list[str] = field(default_factory=list)
    """Glob patterns of model names served as the (first) served model (``--model-alias``)."""

    @property
    def limits(self) -> Limits:
        return Limits(max_messages=self.max_messages, max_tools=self.max_tools,
                      max_schema_bytes=self.max_schema_bytes, max_schema_depth=self.max_schema_depth)
