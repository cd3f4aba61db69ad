"""The embedded store: a SQLite file (stdlib ``sqlite3``), the default.

The file lives under the glmserve cache directory by default (``--responses-db PATH`` moves
it), is created mode 0600 (its WAL and shared-memory files take the same mode) in a
directory created 0700, and is opened in WAL mode, so a restarted server, or a second one on
the same machine, reads what the first wrote.  Writes take the write lock up front
(``BEGIN IMMEDIATE``) so two processes never deadlock upgrading a read.  Queries are short
and run in a worker thread so they never block the event loop.

Running byte totals, of the store (``store_meta``) and of each owner (``store_owners``), kept
by triggers on every insert, replace and delete, make the bounds cheap to check on each write.

Any ``sqlite3`` error is :class:`~glmserve.api.responses.store.StoreUnavailable`; after one
(other than a busy lock) the connection is dropped, so the next operation opens the file
again and creates whatever of the schema is missing: a table dropped under the server, or a
corrupt file replaced by the operator, needs no restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
    StoreFull,
    StoreUnavailable,
    assemble_history,
    encode,
    just_enough,
)
from glmserve.models import cache_dir

log = logging.getLogger("glmserve.responses.store")

SCHEMA_VERSION = 2
"""1: responses only; 2: + ``size``, the ``created_at`` index and the byte total.  Each owner's
byte total (``store_owners``, its triggers, the owner index: per-owner shares) came later, added
in place without a new version: a glmserve that predates it still reads and writes the file
(its trigger-less writes are counted by the triggers all the same)."""
T = TypeVar("T")
_EVICT_BATCH = 64
_SWEEP_BATCH = 1000

# (no INSERT OR IGNORE in the triggers: a trigger's statements take the conflict policy of the
# statement that fired them, the put's upsert)
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS responses ("
    " id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,"
    " previous_response_id TEXT, input_items TEXT NOT NULL, response TEXT NOT NULL,"
    " size INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at, id)",
    "CREATE INDEX IF NOT EXISTS responses_owner ON responses (owner, created_at, id, size)",
    "CREATE TABLE IF NOT EXISTS store_meta (k INTEGER PRIMARY KEY CHECK (k = 1), total_bytes INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS store_owners (owner TEXT PRIMARY KEY, total_bytes INTEGER NOT NULL)",
    "DROP TRIGGER IF EXISTS responses_added",
    "DROP TRIGGER IF EXISTS responses_removed",
    "DROP TRIGGER IF EXISTS responses_changed",
    "CREATE TRIGGER responses_added AFTER INSERT ON responses BEGIN"
    " UPDATE store_meta SET total_bytes = total_bytes + NEW.size WHERE k = 1;"
    " INSERT INTO store_owners SELECT NEW.owner, 0 WHERE NOT EXISTS (SELECT 1 FROM store_owners WHERE owner = NEW.owner);"
    " UPDATE store_owners SET total_bytes = total_bytes + NEW.size WHERE owner = NEW.owner; END",
    "CREATE TRIGGER responses_removed AFTER DELETE ON responses BEGIN"
    " UPDATE store_meta SET total_bytes = total_bytes - OLD.size WHERE k = 1;"
    " UPDATE store_owners SET total_bytes = total_bytes - OLD.size WHERE owner = OLD.owner; END",
    "CREATE TRIGGER responses_changed AFTER UPDATE OF size, owner ON responses BEGIN"
    " UPDATE store_meta SET total_bytes = total_bytes - OLD.size + NEW.size WHERE k = 1;"
    " UPDATE store_owners SET total_bytes = total_bytes - OLD.size WHERE owner = OLD.owner;"
    " INSERT INTO store_owners SELECT NEW.owner, 0 WHERE NOT EXISTS (SELECT 1 FROM store_owners WHERE owner = NEW.owner);"
    " UPDATE store_owners SET total_bytes = total_bytes + NEW.size WHERE owner = NEW.owner; END",
    # the totals, counted afresh (under the write lock the whole schema step holds)
    "INSERT OR REPLACE INTO store_meta VALUES (1, (SELECT COALESCE(SUM(size), 0) FROM responses))",
    "DELETE FROM store_owners",
    "INSERT INTO store_owners SELECT owner, SUM(size) FROM responses GROUP BY owner",
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


def _busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the lock past the timeout: the file itself is fine."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _schema_lost(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith("no such ")


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
        """Create what is missing of the schema; migrate an older one (version 1 has no size
        column: add it and count what is there).  Skipped when the schema is whole."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"{self.path} has schema version {version}; this glmserve writes "
                                        f"{SCHEMA_VERSION} (upgrade glmserve)")
        found = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'trigger')").fetchall())
        tables = set(found)
        whole = {"responses", "store_meta", "store_owners", "responses_added", "responses_removed", "responses_changed"}
        if version == SCHEMA_VERSION and whole <= tables and "store_owners" in found["responses_changed"]:
            return
        if version == 1 and "responses" in tables:
            db.execute("ALTER TABLE responses ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE responses SET size = length(CAST(response AS BLOB)) + length(CAST(input_items AS BLOB))")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if version:
            log.info("responses store: schema version %d in %s (was %d, tables %s)", SCHEMA_VERSION, self.path,
                     version, ", ".join(sorted(tables & whole)) or "none")

    def _cutoff(self) -> float:
        ttl = self.bounds.ttl
        return time.time() - ttl if ttl else float("-inf")

    def _put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]], previous: str | None) -> None:
        resp, items, size = encode(response, input_items)
        rid = response["id"]

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO responses (id, owner, created_at, previous_response_id, input_items, response, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner,"
                " created_at = excluded.created_at, previous_response_id = excluded.previous_response_id,"
                " input_items = excluded.input_items, response = excluded.response, size = excluded.size",
                (rid, owner, time.time(), previous, items, resp, size),
            )
            self._sweep(db, _SWEEP_BATCH)
            if self.bounds.max_bytes_per_owner is not None:
                self._evict_own(db, owner, rid, size)
            elif self.bounds.max_bytes is not None:
                self._evict(db, rid, self.bounds.max_bytes)

        with self._lock:
            self._write(write)

    def _sweep(self, db: sqlite3.Connection, limit: int) -> None:
        """Delete up to ``limit`` expired responses (anyone's: they are gone for everyone)."""
        if self.bounds.ttl:
            db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses WHERE created_at < ?"
                       " ORDER BY created_at LIMIT ?)", (self._cutoff(), limit))

    @staticmethod
    def _evict(db: sqlite3.Connection, keep: str, max_bytes: int) -> None:
        """No shares: delete the oldest responses of any owner (never ``keep``, the one just
        stored) until the total is within ``max_bytes``."""
        while (excess := db.execute("SELECT total_bytes FROM store_meta WHERE k = 1").fetchone()[0] - max_bytes) > 0:
            oldest = db.execute("SELECT id, size FROM responses WHERE id != ? ORDER BY created_at, id LIMIT ?",
                                (keep, _EVICT_BATCH)).fetchall()
            if not oldest:
                return
            db.executemany("DELETE FROM responses WHERE id = ?", [(rid,) for rid in just_enough(oldest, excess)])

    def _evict_own(self, db: sqlite3.Connection, owner: str, keep: str, size: int) -> None:
        """Shares: delete ``owner``'s own oldest responses (never ``keep``, the one just
        stored) until it is within its share and the store within its bound; StoreFull (the
        transaction rolls back) when that cannot be done."""
        def excess() -> int:
            total, owned = db.execute("SELECT (SELECT total_bytes FROM store_meta WHERE k = 1),"
                                      " (SELECT total_bytes FROM store_owners WHERE owner = ?)", (owner,)).fetchone()
            return self.bounds.own_excess(total, owned, size)

        try:
            over = excess()
        except StoreFull:
            self._sweep(db, -1)  # expired responses beyond the usual batch may be what fills it
            over = excess()
        while over > 0:
            oldest = db.execute("SELECT id, size FROM responses WHERE owner = ? AND id != ?"
                                " ORDER BY created_at, id LIMIT ?", (owner, keep, _EVICT_BATCH)).fetchall()
            db.executemany("DELETE FROM responses WHERE id = ?", [(rid,) for rid in just_enough(oldest, over)])
            over = excess()

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

    def _reconnect_after(self, exc: sqlite3.Error) -> None:
        """Drop the connection after a failure of the file itself (not a busy lock): the next
        operation opens it again and creates what is missing of the schema."""
        if not _busy(exc):
            self.close_sync()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` in the worker thread; a schema that went missing (a table dropped under the
        server) is created again and ``fn`` retried once."""
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            self._reconnect_after(exc)
            if not _schema_lost(exc):
                raise
            log.warning("responses store: %s lost its schema (%s); creating it again", self.path, exc)
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            self._reconnect_after(exc)
            raise

    # ----------------------------------------------------------------- async API

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(self._call, fn, *args)
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
            # locked past the timeout, disk full, unwritable, not a database (corrupt), a row
            # that is not JSON, a total row gone: every failure of the file is the store's
            raise StoreUnavailable(f"the response store ({self.path.name}) failed: {type(exc).__name__}: {exc}") \
                from exc

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
                # every table: one dropped under the server shows here, and is created again
                self._db.execute("SELECT (SELECT total_bytes FROM store_meta WHERE k = 1),"
                                 " (SELECT 1 FROM store_owners LIMIT 1), (SELECT 1 FROM responses LIMIT 1)").fetchone()

        await self._run(ping)

    async def total_bytes(self) -> int:
        def total() -> int:
            with self._lock:
                return int(self._db.execute("SELECT total_bytes FROM store_meta WHERE k = 1").fetchone()[0])

        return await self._run(total)

    async def owner_bytes(self, owner: str) -> int:
        def owned() -> int:
            with self._lock:
                row = self._db.execute("SELECT total_bytes FROM store_owners WHERE owner = ?", (owner,)).fetchone()
            return int(row[0]) if row else 0

        return await self._run(owned)

    async def close(self) -> None:
        self.close_sync()

    def close_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
