"""Stored responses: the contract both backends keep (the factory that picks one is
:mod:`glmserve.api.responses.store_factory`).

One row per stored response: the response object as returned, the input items of its own
request, and the ``previous_response_id`` it continued.  ``previous_response_id`` rebuilds a
conversation by walking that chain back (each response stores only its own turn, so a long
conversation costs linear, not quadratic, space).  Every row belongs to the API key that
created it (``owner``, an identity of the key that the auth middleware derives, "" when
auth is off): another key sees no such response.

Backends (:func:`~glmserve.api.responses.store_factory.open_store` picks one from ``--responses-db``):

* :class:`~glmserve.api.responses.store_sqlite.SQLiteStore`, the embedded default: a file
  (mode 0600) under the glmserve cache directory; one server, or several on one machine.
* :class:`~glmserve.api.responses.store_postgres.PostgresStore` for ``postgresql://`` URLs:
  many replicas share it, so none of them keeps state of its own.

Both keep the same bounds: a response expires ``ttl`` seconds after it was stored (30 days
by default, as OpenAI keeps them), and when the stored bytes pass ``max_bytes`` the oldest
responses are evicted.  A database that cannot answer within ``timeout`` seconds raises
:class:`StoreUnavailable` (a 503 for the client), never a hang.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

MAX_CHAIN = 10_000
"""Longest previous_response_id chain followed (a guard, far beyond any conversation)."""
DEFAULT_TTL = 30 * 24 * 3600.0
"""Seconds a stored response is kept (OpenAI keeps responses 30 days)."""
DEFAULT_MAX_BYTES = 1 << 30
"""Stored bytes (responses and their input items, as JSON) before the oldest are evicted."""
DEFAULT_TIMEOUT = 5.0
"""Seconds a store operation may take before the client gets a 503."""


class ChainBroken(LookupError):
    """A response in the chain was deleted or expired (or the chain is absurdly long)."""


class StoreUnavailable(RuntimeError):
    """The database did not answer (down, unreachable, or slower than the timeout)."""


@dataclass
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    previous_response_id: str | None


@dataclass(frozen=True)
class Bounds:
    """Retention: ``ttl`` seconds (None: kept until evicted or deleted) and ``max_bytes``
    (None: unbounded)."""

    ttl: float | None = DEFAULT_TTL
    max_bytes: int | None = DEFAULT_MAX_BYTES


def encode(response: dict[str, Any], input_items: list[dict[str, Any]]) -> tuple[str, str, int]:
    """The two JSON columns and the row's size in bytes (what ``max_bytes`` counts)."""
    resp, items = json.dumps(response, ensure_ascii=False), json.dumps(input_items, ensure_ascii=False)
    return resp, items, len(resp.encode()) + len(items.encode())


def just_enough(oldest: list[tuple[str, int]], excess: int) -> list[str]:
    """The ids, oldest first, whose sizes first add up to ``excess`` (all of them if they
    do not): what eviction removes from one batch."""
    picked: list[str] = []
    for rid, size in oldest:
        if excess <= 0:
            break
        picked.append(rid)
        excess -= size
    return picked


def assemble_history(response_id: str, rows: list[tuple[str, str, str | None]]) -> list[dict[str, Any]] | None:
    """The conversation from the chain's rows, newest first as the recursive query returns
    them (``(response, input_items, previous_response_id)``): each turn's input items then
    its output items, oldest first.  None when ``response_id`` itself is not there."""
    if not rows:
        return None
    if len(rows) > MAX_CHAIN:
        raise ChainBroken(f"the conversation of {response_id} is longer than {MAX_CHAIN} responses")
    missing = rows[-1][2]
    if missing is not None:
        raise ChainBroken(f"the conversation of {response_id} continues {missing}, which was deleted or expired")
    items: list[dict[str, Any]] = []
    for response, input_items, _ in reversed(rows):
        items.extend(json.loads(input_items))
        items.extend(json.loads(response).get("output") or [])
    return items


class ResponseStore(ABC):
    """What the Responses routes need of a store; every method may raise
    :class:`StoreUnavailable`."""

    bounds: Bounds

    @abstractmethod
    async def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]],
                  previous_response_id: str | None) -> None:
        """Store (or replace) ``response``; returns once it is durable, evicting the oldest
        responses if the store is over ``max_bytes``."""

    @abstractmethod
    async def get(self, owner: str, response_id: str) -> Stored | None:
        """``owner``'s unexpired response, or None."""

    @abstractmethod
    async def delete(self, owner: str, response_id: str) -> bool:
        """Remove ``owner``'s response; False when there is none."""

    @abstractmethod
    async def history(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation up to and including ``response_id``, oldest first (see
        :func:`assemble_history`); None when ``response_id`` is unknown."""

    async def start(self) -> None:
        """Connect and create or migrate the schema now, at start-up (a store that opens on
        first use does nothing here)."""

    @abstractmethod
    async def total_bytes(self) -> int:
        """The stored bytes that ``max_bytes`` bounds."""

    @abstractmethod
    async def check(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers now (``/health``)."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connections."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs (never a password)."""
