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

Both keep the same bounds (:class:`Bounds`): a response expires ``ttl`` seconds after it was
stored (30 days by default, as OpenAI keeps them); the stored bytes stay within ``max_bytes``;
and with a per-owner share (``max_bytes_per_owner``) an owner's write evicts only that owner's
own oldest responses -- so one API key posting large inputs can never evict another key's
responses -- and is refused (:class:`StoreFull`, nothing evicted) when even that would not
make room.  Without shares the oldest responses of any owner are evicted.

Every failure of the database, whatever it raises (down, unreachable, slower than
``timeout``, a corrupt file, a read-only standby, a schema dropped under the server), is
:class:`StoreUnavailable` (a 503 for the client), never a hang and never another exception;
a schema that went missing is created again on the next operation, without a restart.
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
    """The database failed: it did not answer (down, unreachable, slower than the timeout) or
    answered with an error (a corrupt file, read-only, a schema it lost)."""


class StoreFull(RuntimeError):
    """A response the store cannot keep without evicting another owner's responses: larger
    than the owner's share, or the other owners hold all the room ``max_bytes`` leaves.  The
    write is refused and nothing is evicted."""


@dataclass
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    previous_response_id: str | None


@dataclass(frozen=True)
class Bounds:
    """Retention: ``ttl`` seconds (None: kept until evicted or deleted), ``max_bytes`` (None:
    unbounded) and ``max_bytes_per_owner``, each owner's share (None: no shares)."""

    ttl: float | None = DEFAULT_TTL
    max_bytes: int | None = DEFAULT_MAX_BYTES
    max_bytes_per_owner: int | None = None

    def own_excess(self, total: int, owned: int, size: int) -> int:
        """With shares: the bytes an owner must evict from its own older responses once it
        stored one of ``size`` bytes (``total``, the store's bytes, and ``owned``, the owner's,
        both count it).  :class:`StoreFull` when evicting all of them would not be enough."""
        share, bound = self.max_bytes_per_owner, self.max_bytes
        if share is not None and size > share:
            raise StoreFull(f"a response of {size} bytes is larger than an API key's share of the store "
                            f"({share} bytes)")
        if bound is not None and total - owned + size > bound:
            raise StoreFull(f"other API keys hold {total - owned} of the store's {bound} bytes: no room for "
                            f"{size} more without evicting their responses")
        excess = owned - share if share is not None else 0
        return max(excess, total - bound) if bound is not None else excess


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
    :class:`StoreUnavailable`, and no other exception for a failure of the database."""

    bounds: Bounds

    @abstractmethod
    async def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]],
                  previous_response_id: str | None) -> None:
        """Store (or replace) ``response``; returns once it is durable, having evicted what
        the bounds require (:class:`Bounds`), or raises :class:`StoreFull` having stored and
        evicted nothing."""

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
    async def owner_bytes(self, owner: str) -> int:
        """``owner``'s stored bytes, which ``max_bytes_per_owner`` bounds."""

    @abstractmethod
    async def check(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers now (``/health``)."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connections."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs (never a password)."""
