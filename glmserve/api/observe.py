"""The narrow interface through which one request's way through the pipeline can be watched.

The runner and the pipeline tell the :class:`RequestObserver` attached to the current request
what they did, at a few fixed points (the constraint built, the request prepared, each engine
delta parsed, each choice finished, an error sent in-band, the request-log line).  Whoever
watches (the request inspector, :mod:`glmserve.api.inspector`) attaches its observer to the
request's context with :func:`attach`; the context is the request's task, which the streamed
body's task inherits.  With none attached, the default, a watched point costs one ContextVar
read: the pipeline reads it once per stage, never per token.

Observers must not raise and must not block: they run on the event loop, inside the request.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from glmserve.api.pipeline import Prepared
    from glmserve.formats.base import ChatRequest, Constraint, Event, Prompt
    from glmserve.formats.message import MessageBuilder


class RequestObserver(Protocol):
    """What the pipeline reports about one request, in the order it happens."""

    def constraint(self, chat: "ChatRequest", constraint: "Constraint | None", seconds: float, cache_hit: bool) -> None:
        """The tool constraint was built for ``chat`` in ``seconds``; ``cache_hit``: no grammar
        or schema check had to be compiled for it (every one came from the caches)."""

    def prepared(self, run: "Prepared", prompt: "Prompt") -> None:
        """Rendered, tokenized, checked: ``run`` is what the engine will get."""

    def text_prepared(self, request_id: str, model: str, prompts: list[str], params: dict[str, Any]) -> None:
        """A legacy completion was prepared: its prompts as the client sent them (no template
        renders them; a prompt of token ids is described, not decoded) and its parameters."""

    def output(self, index: int, text: str, events: "list[Event]", num_tokens: int) -> None:
        """One engine delta of choice ``index``: its raw text and the parser's events for it."""

    def finished(self, index: int, reason: str, builder: "MessageBuilder") -> None:
        """Choice ``index`` ended (``stop`` / ``length`` / ``tool_calls``) with this message."""

    def failed(self, status: int, message: str) -> None:
        """The answer failed after its headers were sent: the error went in-band."""

    def logged(self, endpoint: str, request_id: str, prompt_tokens: int, status: int, fields: dict[str, Any]) -> None:
        """The request's log line (:class:`~glmserve.api.admission.RequestLog`): it is over."""


_CURRENT: ContextVar[RequestObserver | None] = ContextVar("glmserve_request_observer", default=None)


def current() -> RequestObserver | None:
    """The observer of the request being served, or None (nobody watches)."""
    return _CURRENT.get()


def attach(observer: RequestObserver) -> Token[RequestObserver | None]:
    """Watch the request whose context this is (and the tasks it starts from now on)."""
    return _CURRENT.set(observer)


def detach(token: Token[RequestObserver | None]) -> None:
    _CURRENT.reset(token)
