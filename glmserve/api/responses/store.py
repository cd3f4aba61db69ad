"""Stored responses: an embedded SQLite database (stdlib ``sqlite3``).

One row per stored response: the response object as returned, the input items of its own
request, and the ``previous_response_id`` it continued.  ``previous_response_id`` rebuilds a
conversation by walking that chain back (each response stores only its own turn, so a long
conversation costs linear, not quadratic, space).  Every row belongs to the API key that
created it (``owner``, an identity of the key that the auth middleware derives, "" when
auth is off): another key sees no such response.

The file lives under the glmserve cache directory by default (``glmserve serve
--responses-db PATH`` moves it); it is opened in WAL mode, so a restarted server, or a
second one, reads what the first wrote.  Queries are short and run in a worker thread so
they never block the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmserve.models import cache_dir

SCHEMA_VERSION = 1
MAX_CHAIN = 10_000
"""Longest previous_response_id chain followed (a guard, far beyond any conversation)."""


def default_db_path() -> Path:
    return cache_dir() / "responses.sqlite3"


class ChainBroken(LookupError):
    """A response in the chain was deleted (or the chain is absurdly long)."""


@dataclass
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    previous_response_id: str | None


class ResponseStore:
    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,"
                " previous_response_id TEXT, input_items TEXT NOT NULL, response TEXT NOT NULL)"
            )
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}; this glmserve writes {SCHEMA_VERSION}")

    # ----------------------------------------------------------------- sync (worker thread)

    def _put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]], previous: str | None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                (response["id"], owner, time.time(), previous,
                 json.dumps(input_items, ensure_ascii=False), json.dumps(response, ensure_ascii=False)),
            )

    def _get(self, owner: str, response_id: str) -> Stored | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, input_items, previous_response_id FROM responses WHERE id = ? AND owner = ?",
                (response_id, owner),
            ).fetchone()
        if row is None:
            return None
        return Stored(json.loads(row[0]), json.loads(row[1]), row[2])

    def _delete(self, owner: str, response_id: str) -> bool:
        with self._lock, self._db:
            cur = self._db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        return cur.rowcount > 0

    def _history(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation up to and including ``response_id``, oldest first: each turn's
        input items followed by its output items.  None when ``response_id`` is unknown."""
        turns: list[Stored] = []
        current: str | None = response_id
        while current is not None:
            if len(turns) >= MAX_CHAIN:
                raise ChainBroken(f"the conversation of {response_id} is longer than {MAX_CHAIN} responses")
            stored = self._get(owner, current)
            if stored is None:
                if not turns:
                    return None
                raise ChainBroken(f"the conversation of {response_id} continues {current}, which was deleted")
            turns.append(stored)
            current = stored.previous_response_id
        items: list[dict[str, Any]] = []
        for stored in reversed(turns):
            items.extend(stored.input_items)
            items.extend(stored.response.get("output") or [])
        return items

    # ----------------------------------------------------------------- async API

    async def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]],
                  previous_response_id: str | None) -> None:
        await asyncio.to_thread(self._put, owner, response, input_items, previous_response_id)

    async def get(self, owner: str, response_id: str) -> Stored | None:
        return await asyncio.to_thread(self._get, owner, response_id)

    async def delete(self, owner: str, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete, owner, response_id)

    async def history(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        return await asyncio.to_thread(self._history, owner, response_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
