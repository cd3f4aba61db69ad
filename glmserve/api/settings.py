"""The server's knobs (set from ``glmserve serve`` flags)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from glmserve.api.mapping import Limits
from glmserve.server_secret import ServerSecret

ArgumentHook = Callable[[str, str], str]
"""``hook(tool_name, arguments_json) -> arguments_json``: sees each finished call."""


def check_api_keys(keys: list[str], source: str = "api_keys") -> None:
    """Refuse keys no client can send: an empty or blank one (``--api-key "$KEY"`` with KEY
    unset) would otherwise leave auth on while meaning nothing, and a key with spaces at its
    ends never matches (offered keys are stripped)."""
    for i, key in enumerate(keys):
        if not key.strip():
            raise ValueError(f"{source}: key {i + 1} of {len(keys)} is empty or blank; refusing to start "
                             "(an unset variable in --api-key \"$KEY\"?)")
        if key != key.strip():
            raise ValueError(f"{source}: key {i + 1} of {len(keys)} starts or ends with whitespace, "
                             "which no client can send")


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
    # the Responses store (``glmserve.api.responses.store``)
    responses_db: str | None = None
    """Where stored Responses live (``--responses-db``): a SQLite file, or a ``postgresql://`` URL
    that replicas share (None: ``<glmserve cache>/responses.sqlite3``)."""
    responses_ttl: float | None = 30 * 24 * 3600.0
    """Seconds a stored response is kept (``--responses-ttl``; None: until evicted or deleted)."""
    responses_max_bytes: int | None = 1 << 30
    """Stored bytes before the oldest responses are evicted (``--responses-max-bytes``; None: no bound)."""
    responses_max_bytes_per_key: int | None = None
    """Each API key's share of the store (``--responses-max-bytes-per-key``): a key's writes evict
    only its own oldest responses.  None: ``responses_max_bytes`` divided among the API keys
    (:attr:`responses_share`); 0: no shares, the oldest responses of any key are evicted."""
    responses_db_timeout: float = 5.0
    """Seconds a store operation may take before the client gets a 503 (``--responses-db-timeout``)."""
    secret: ServerSecret | None = None
    """Signs thinking blocks and seals reasoning items (``--secret-file``, ``GLMSERVE_SECRET``; None: the
    secret generated under the glmserve cache, :func:`glmserve.server_secret.default_secret`)."""
    image_input: str = "note"
    """``note``: image / video / audio parts become a text note (:mod:`glmserve.api.media`);
    ``reject``: they are a 400 (``--image-input``)."""
    model_aliases: list[str] = field(default_factory=list)
    """Glob patterns of model names served as the (first) served model (``--model-alias``)."""
    wait_for_grammar: bool = False
    """``--wait-for-grammar``: every constrained answer waits for its whole grammar, as before
    :mod:`glmserve.api.early_start` (False: ``auto`` answers start under a prelude while the tool
    set's grammar compiles)."""
    read_timeout: float | None = 30.0
    """Seconds a client gets to send a request's headers, and then its body (``--read-timeout``;
    None: no limit); past it, 408."""
    inspect: int = 0
    """``--inspect N``: the request inspector keeps the last N requests in memory (0: off)."""
    inspect_max_bytes: int = 64 << 20
    """``--inspect-max-bytes``: about how much memory the inspector's requests may take."""
    max_header_bytes: int = 64 * 1024
    """Largest request head (request line and headers) accepted (``--max-header-bytes``); past it, 431."""
    write_timeout: float | None = 60.0
    """Seconds a response's write may make no progress (the client reads nothing) before the
    connection is aborted, its engine request too (``--write-timeout``; None: no limit)."""

    def __post_init__(self) -> None:
        check_api_keys(self.api_keys)
        for name in ("read_timeout", "write_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not self.max_header_bytes > 0:
            raise ValueError(f"max_header_bytes must be a positive number of bytes, got {self.max_header_bytes!r}")
        if self.inspect < 0 or self.inspect_max_bytes < 1:
            raise ValueError("inspect must be 0 (off) or more, inspect_max_bytes at least 1")

    @property
    def responses_share(self) -> int | None:
        """The store's per-key share in bytes (None: no shares).  By default the bound divided
        among the keys, so that the shares add up to it and no key ever finds the store full."""
        if self.responses_max_bytes_per_key is not None:
            return self.responses_max_bytes_per_key or None
        if self.responses_max_bytes is None:
            return None
        return self.responses_max_bytes // max(1, len(self.api_keys))

    @property
    def limits(self) -> Limits:
        return Limits(max_messages=self.max_messages, max_tools=self.max_tools,
                      max_schema_bytes=self.max_schema_bytes, max_schema_depth=self.max_schema_depth)
