"""The embedded store: a SQLite file (stdlib ``sqlite3``), the default.

The file lives under the glmserve cache directory by default (``--responses-db PATH`` moves
it), is created mode 0600 (its WAL and shared-memory files take the same mode) in a
directory created 0700, and is opened in WAL mode, so a restarted server, or a second one on
the same machine, reads what the first wrote.  Writes take the write lock up front
(``BEGIN IMMEDIATE``) so two processes never deadlock upgrading a read.  Queries are short
and run in a worker thread so they never block the event loop.

A running byte total (``store_meta``, kept by triggers on every insert, replace and delete)
makes the size bound cheap to check on each write.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from glmserve.api.responses.store import (
    MAX_CHAIN,
    Bounds,
    ResponseStore,
    Stored,
    StoreUnavailable,
    assemble_history,
    encode,
    just_enough,
)
from glmserve.models import cache_dir

SCHEMA_VERSION = 2
"""1: responses only; 2: + ``size``, the ``created_at`` index and the byte total."""
T = TypeVar("T")
_EVICT_BATCH = 64
_SWEEP_BATCH = 1000

_SCHEMA_V2 = [
    "CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at, id)",
    "CREATE TABLE IF NOT EXISTS store_meta (k INTEGER PRIMARY KEY CHECK (k = 1), total_bytes INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO store_meta VALUES (1, (SELECT COALESCE(SUM(size), 0) FROM responses))",
    "CREATE TRIGGER IF NOT EXISTS responses_added AFTER INSERT ON responses BEGIN"
    " UPDATE store_meta SET total_bytes = total_bytes + NEW.size WHERE k = 1; END",
    "CREATE TRIGGER IF NOT EXISTS responses_removed AFTER DELETE ON responses BEGIN"
    " UPDATE store_meta SET total_bytes = total_bytes - OLD.size WHERE k = 1; END",
    "CREATE TRIGGER IF NOT EXISTS responses_changed AFTER UPDATE OF size ON responses BEGIN"
    " UPDATE store_meta SET total_bytes = total_bytes - OLD.size + NEW.size WHERE k = 1; END",
]

_CHAIN = (
    "WITH RECURSIVE chain(depth, response, input_items, prev) AS ("
    " SELECT 0, response, input_items, previous_response_id FROM responses"
    "  WHERE id = ? AND owner = ? AND created_at >= ?"
    " UNION ALL"
    " SELECT chain.depth + 1, r.response, r.input_items, r.previous_response_id FROM responses r"
    "  JOIN chain ON r.id = chain.prev WHERE r.owner = ? AND r.created_at >= ? AND chain.depth < ?)"
    " SELECT response, input_items, prev FROM chain ORDER BY depth"
)


def default_db_path() -> Path:
    return cache_dir() / "responses.sqlite3"


def private_file(path: Path) -> None:
    """Create ``path`` (and missing parents, 0700) readable by its owner only, or tighten an
    existing file of ours to 0600."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SQLiteStore(ResponseStore):
    def __init__(self, path: Path | str | None = None, bounds: Bounds | None = None, timeout: float = 5.0) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.bounds = bounds or Bounds()
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection, opened (and the schema created or migrated) on first use; the
        caller holds ``self._lock``."""
        if self._conn is None:
            private_file(self.path)
            # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE below
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=self.timeout, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                self._conn = db
                self._write(self._migrate)
            except BaseException:
                self._conn = None
                db.close()
                raise
        return self._conn

    def describe(self) -> str:
        return f"SQLite {self.path}"

    # ----------------------------------------------------------------- sync (worker thread)

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in one write transaction (the caller holds ``self._lock``)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,"
            " previous_response_id TEXT, input_items TEXT NOT NULL, response TEXT NOT NULL,"
            " size INTEGER NOT NULL DEFAULT 0)"
        )
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 1:  # no size column yet: add it and count what is there
            db.execute("ALTER TABLE responses ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE responses SET size = length(CAST(response AS BLOB)) + length(CAST(input_items AS BLOB))")
        elif version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path} has schema version {version}; this glmserve writes {SCHEMA_VERSION}")
        for statement in _SCHEMA_V2:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _cutoff(self) -> float:
        ttl = self.bounds.ttl
        return time.time() - ttl if ttl else float("-inf")

    def _put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]], previous: str | None) -> None:
        resp, items, size = encode(response, input_items)

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO responses (id, owner, created_at, previous_response_id, input_items, response, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner,"
                " created_at = excluded.created_at, previous_response_id = excluded.previous_response_id,"
                " input_items = excluded.input_items, response = excluded.response, size = excluded.size",
                (response["id"], owner, time.time(), previous, items, resp, size),
            )
            if self.bounds.ttl:
                db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses WHERE created_at < ?"
                           " ORDER BY created_at LIMIT ?)", (self._cutoff(), _SWEEP_BATCH))
            if self.bounds.max_bytes is not None:
                self._evict(db, response["id"], self.bounds.max_bytes)

        with self._lock:
            self._write(write)

    @staticmethod
    def _evict(db: sqlite3.Connection, keep: str, max_bytes: int) -> None:
        """Delete the oldest responses (never ``keep``, the one just stored) until the total
        is within ``max_bytes``."""
        while (excess := db.execute("SELECT total_bytes FROM store_meta WHERE k = 1").fetchone()[0] - max_bytes) > 0:
            oldest = db.execute("SELECT id, size FROM responses WHERE id != ? ORDER BY created_at, id LIMIT ?",
                                (keep, _EVICT_BATCH)).fetchall()
            if not oldest:
                return
            db.executemany("DELETE FROM responses WHERE id = ?", [(rid,) for rid in just_enough(oldest, excess)])

    def _get(self, owner: str, response_id: str) -> Stored | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, input_items, previous_response_id FROM responses"
                " WHERE id = ? AND owner = ? AND created_at >= ?",
                (response_id, owner, self._cutoff()),
            ).fetchone()
        if row is None:
            return None
        return Stored(json.loads(row[0]), json.loads(row[1]), row[2])

    def _delete(self, owner: str, response_id: str) -> bool:
        with self._lock:
            cur = self._write(lambda db: db.execute(
                "DELETE FROM responses WHERE id = ? AND owner = ? AND created_at >= ?",
                (response_id, owner, self._cutoff())))
        return cur.rowcount > 0

    def _history(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        cutoff = self._cutoff()
        with self._lock:
            rows = self._db.execute(_CHAIN, (response_id, owner, cutoff, owner, cutoff, MAX_CHAIN)).fetchall()
        return assemble_history(response_id, rows)

    # ----------------------------------------------------------------- async API

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except (sqlite3.OperationalError, OSError) as exc:  # locked past the timeout, disk full, unwritable
            raise StoreUnavailable(f"the response store ({self.path.name}) failed: {exc}") from exc

    async def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]],
                  previous_response_id: str | None) -> None:
        await self._run(self._put, owner, response, input_items, previous_response_id)

    async def get(self, owner: str, response_id: str) -> Stored | None:
        return await self._run(self._get, owner, response_id)

    async def delete(self, owner: str, response_id: str) -> bool:
        return await self._run(self._delete, owner, response_id)

    async def history(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        return await self._run(self._history, owner, response_id)

    async def check(self) -> None:
        def ping() -> None:
            with self._lock:
                self._db.execute("SELECT 1 FROM store_meta").fetchone()

        await self._run(ping)

    async def total_bytes(self) -> int:
        def total() -> int:
            with self._lock:
                return int(self._db.execute("SELECT total_bytes FROM store_meta WHERE k = 1").fetchone()[0])

        return await self._run(total)

    async def close(self) -> None:
        self.close_sync()

    def close_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
