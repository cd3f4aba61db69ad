"""The shared store: PostgreSQL (psycopg 3, an async connection pool).

``--responses-db postgresql://...``: every replica reads and writes the same rows, so
``previous_response_id`` and ``GET``/``DELETE /v1/responses/{id}`` answer the same whichever
replica the load balancer picks, and no replica keeps state of its own.

* The schema is created or migrated on start-up (and on first use, if the database was
  down then) under a transaction-scoped advisory lock, so replicas starting together do not
  race on DDL.  Tables are prefixed ``glmserve_`` so the database may be shared.
* Times are the database's clock (one clock for all replicas).
* Every write locks the one ``glmserve_meta`` row (a ``DELETE`` before any response row, a
  put through its insert's trigger, holding only its own new row): writers serialize on it
  without deadlocks, and the byte totals kept by triggers on every insert, replace and delete
  (the store's there, each owner's in ``glmserve_owners``) stay exact with any number of replicas.
* Every operation is bounded: a connection must come from the pool within ``timeout``
  seconds, statements are cancelled by the server after ``timeout`` (``statement_timeout``),
  and the whole operation by the client after that (a stalled server cannot hold a request).
  Any failure, whatever the driver raises (an ``InternalError`` from a read-only standby
  after a failover too), raises :class:`StoreUnavailable` (a 503); the pool checks each
  connection it hands out and replaces dead ones, so when the database comes back the next
  request works, with no restart.  A schema that went away (tables dropped, the database
  recreated empty) is created again by the operation that finds it missing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

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

log = logging.getLogger("glmserve.responses.store")

SCHEMA_VERSION = 2
"""The same content as the SQLite store's version 2, each owner's byte total (``glmserve_owners``)
included: added in place, so a replica that predates it keeps working during a rolling upgrade."""
T = TypeVar("T")
_LOCK_ID = 0x676C6D73  # "glms": the advisory lock taken while creating or migrating the schema
_EVICT_BATCH = 64
_SWEEP_BATCH = 1000
_NO_TTL = 1e15  # seconds: "never expires" as a number the queries can subtract
_TABLES = ("glmserve_responses", "glmserve_meta", "glmserve_owners")
_SCHEMA_LOST = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedFunction,
                psycopg.errors.UndefinedObject)
"""What a statement raises when the schema went away under the server (dropped, or the database
recreated empty): it is created again and the operation retried."""

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS glmserve_responses ("
    " id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
    " previous_response_id TEXT, input_items TEXT NOT NULL, response TEXT NOT NULL, size BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS glmserve_responses_created ON glmserve_responses (created_at, id)",
    "CREATE INDEX IF NOT EXISTS glmserve_responses_owner ON glmserve_responses (owner, created_at, id) INCLUDE (size)",
    "CREATE TABLE IF NOT EXISTS glmserve_meta ("
    " k INT PRIMARY KEY CHECK (k = 1), schema_version INT NOT NULL, total_bytes BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS glmserve_owners (owner TEXT PRIMARY KEY, total_bytes BIGINT NOT NULL)",
    # the meta row first, then the owner's: every writer locks them in that order
    "CREATE OR REPLACE FUNCTION glmserve_account() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    " IF TG_OP = 'INSERT' THEN"
    "  UPDATE glmserve_meta SET total_bytes = total_bytes + NEW.size WHERE k = 1;"
    "  INSERT INTO glmserve_owners VALUES (NEW.owner, NEW.size)"
    "   ON CONFLICT (owner) DO UPDATE SET total_bytes = glmserve_owners.total_bytes + EXCLUDED.total_bytes;"
    " ELSIF TG_OP = 'DELETE' THEN"
    "  UPDATE glmserve_meta SET total_bytes = total_bytes - OLD.size WHERE k = 1;"
    "  UPDATE glmserve_owners SET total_bytes = total_bytes - OLD.size WHERE owner = OLD.owner;"
    " ELSE"
    "  UPDATE glmserve_meta SET total_bytes = total_bytes - OLD.size + NEW.size WHERE k = 1;"
    "  UPDATE glmserve_owners SET total_bytes = total_bytes - OLD.size WHERE owner = OLD.owner;"
    "  INSERT INTO glmserve_owners VALUES (NEW.owner, NEW.size)"
    "   ON CONFLICT (owner) DO UPDATE SET total_bytes = glmserve_owners.total_bytes + EXCLUDED.total_bytes;"
    " END IF; RETURN NULL; END $$",
    # (re)creating the trigger locks the table against writers until the totals below are counted
    "DROP TRIGGER IF EXISTS glmserve_account ON glmserve_responses",
    "CREATE TRIGGER glmserve_account AFTER INSERT OR DELETE OR UPDATE OF size, owner ON glmserve_responses"
    " FOR EACH ROW EXECUTE FUNCTION glmserve_account()",
    "DELETE FROM glmserve_owners",
    "INSERT INTO glmserve_owners SELECT owner, SUM(size) FROM glmserve_responses GROUP BY owner",
]

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"
_LIVE = f"created_at >= {_NOW} - %(ttl)s"

_CHAIN = (
    "WITH RECURSIVE chain(depth, response, input_items, prev) AS ("
    " SELECT 0, response, input_items, previous_response_id FROM glmserve_responses"
    f"  WHERE id = %(id)s AND owner = %(owner)s AND {_LIVE}"
    " UNION ALL"
    " SELECT chain.depth + 1, r.response, r.input_items, r.previous_response_id FROM glmserve_responses r"
    f"  JOIN chain ON r.id = chain.prev WHERE r.owner = %(owner)s AND r.{_LIVE} AND chain.depth < %(max)s)"
    " SELECT response, input_items, prev FROM chain ORDER BY depth"
)

_PUT = (
    "INSERT INTO glmserve_responses (id, owner, created_at, previous_response_id, input_items, response, size)"
    f" VALUES (%(id)s, %(owner)s, {_NOW}, %(prev)s, %(items)s, %(resp)s, %(size)s)"
    " ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, created_at = EXCLUDED.created_at,"
    " previous_response_id = EXCLUDED.previous_response_id, input_items = EXCLUDED.input_items,"
    " response = EXCLUDED.response, size = EXCLUDED.size"
)


def describe_url(url: str) -> str:
    """``host:port/dbname`` of a connection URL (never its password)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "PostgreSQL (unparsable URL)"
    host = info.get("host") or "localhost"
    return f"PostgreSQL {host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or ''}"


class PostgresStore(ResponseStore):
    def __init__(self, url: str, bounds: Bounds | None = None, timeout: float = 5.0,
                 max_connections: int = 8) -> None:
        self.url = url
        self.bounds = bounds or Bounds()
        self.timeout = timeout
        self.max_connections = max_connections
        self._pool: AsyncConnectionPool | None = None
        self._stale = False
        self._opened = 0.0
        self._closing: set[asyncio.Future[None]] = set()
        self._ready = False
        self._setup: asyncio.Lock | None = None

    def describe(self) -> str:
        return describe_url(self.url)

    @property
    def _ttl(self) -> float:
        return self.bounds.ttl or _NO_TTL

    def _connect_kwargs(self) -> dict[str, Any]:
        ms = max(1, int(self.timeout * 1000))
        return {
            "connect_timeout": max(2, int(self.timeout + 0.999)),  # libpq: whole seconds, at least 2
            "options": f"-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={4 * ms}",
            "autocommit": True,  # writes open their own transaction
            "prepare_threshold": None,  # works behind a transaction-pooling PgBouncer too
            "application_name": "glmserve",
        }

    async def _get_pool(self) -> AsyncConnectionPool:
        if self._pool is not None and self._stale and time.monotonic() - self._opened > self.timeout:
            # The pool could not connect: it retries with an exponential back-off, which would
            # keep this replica failing long after the database is back.  A fresh pool
            # connects at once; the old one is closed aside (at most once per timeout).
            old, self._pool = self._pool, None
            task = asyncio.ensure_future(old.close(timeout=0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if self._pool is None:
            pool = AsyncConnectionPool(
                self.url, min_size=1, max_size=self.max_connections, open=False, kwargs=self._connect_kwargs(),
                timeout=self.timeout, check=AsyncConnectionPool.check_connection, name="glmserve-responses")
            await pool.open(wait=False)
            self._pool, self._stale, self._opened = pool, False, time.monotonic()
        return self._pool

    async def _ensure_schema(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Create or migrate the schema, once per store (again after :data:`_SCHEMA_LOST`):
        under an advisory lock, so replicas starting together do not race on DDL."""
        if self._ready:
            return
        if self._setup is None:
            self._setup = asyncio.Lock()
        async with self._setup:
            if self._ready:
                return
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
                found = (await (await conn.execute(
                    "SELECT " + ", ".join(f"to_regclass('{t}') IS NOT NULL" for t in _TABLES))).fetchone())
                version = 0
                if found[1]:
                    version = (await (await conn.execute("SELECT schema_version FROM glmserve_meta WHERE k = 1"))
                               .fetchone() or (0,))[0]
                if version > SCHEMA_VERSION:
                    raise StoreUnavailable(f"the database's glmserve schema is version {version}; this glmserve "
                                           f"writes {SCHEMA_VERSION} (upgrade glmserve)")
                if version < SCHEMA_VERSION or not all(found):
                    for statement in _SCHEMA:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO glmserve_meta VALUES (1, %s, (SELECT COALESCE(SUM(size), 0) FROM glmserve_responses))"
                        " ON CONFLICT (k) DO UPDATE SET schema_version = EXCLUDED.schema_version,"
                        " total_bytes = EXCLUDED.total_bytes", (SCHEMA_VERSION,))
                    log.info("responses store: schema version %d in %s (was %d%s)", SCHEMA_VERSION, self.describe(),
                             version, "" if all(found) else "; tables were missing")
            self._ready = True

    async def _run(self, what: str, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """``fn`` on a pooled connection, the whole bounded by the timeout; every database
        failure, whatever the driver raises, becomes :class:`StoreUnavailable`.  A schema
        that went away (:data:`_SCHEMA_LOST`) is created again and ``fn`` retried once."""
        async def op() -> T:
            pool = await self._get_pool()
            async with pool.connection() as conn:
                await self._ensure_schema(conn)
                try:
                    return await fn(conn)
                except _SCHEMA_LOST as exc:
                    log.warning("responses store: %s lost its schema (%s); creating it again", self.describe(),
                                str(exc).splitlines()[0])
                    self._ready = False
                await self._ensure_schema(conn)
                return await fn(conn)

        def failed(detail: str) -> StoreUnavailable:
            return StoreUnavailable(f"the response store ({self.describe()}) failed to {what}: {detail}")

        try:
            # the pool and the server bound each step by `timeout`; this bounds a stalled server
            return await asyncio.wait_for(op(), 2 * self.timeout + 1)
        except PoolTimeout as exc:
            self._stale = True
            raise failed(f"no connection in {self.timeout:g} s (is the database up?)") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise failed(str(exc)) from exc
        except psycopg.Error as exc:  # InternalError (a read-only standby after a failover), ...
            raise failed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        except (ValueError, TypeError) as exc:  # a row that is not JSON, a total row gone
            raise failed(f"unreadable data ({type(exc).__name__}: {exc})") from exc
        except asyncio.TimeoutError as exc:
            raise StoreUnavailable(f"the response store ({self.describe()}) did not answer in time to {what}") from exc

    # ----------------------------------------------------------------- the interface

    async def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]],
                  previous_response_id: str | None) -> None:
        resp, items, size = encode(response, input_items)
        rid = response["id"]

        async def write(conn: psycopg.AsyncConnection[Any]) -> None:
            # One round trip for the common case (pipeline mode).  The insert's trigger locks
            # the meta row; the only row locked before it is the new one, which no other
            # transaction can see yet, so this cannot deadlock with a DELETE (which locks the
            # meta row first) or another writer's eviction.
            async with conn.pipeline(), conn.transaction():
                await conn.execute(_PUT, {"id": rid, "owner": owner, "prev": previous_response_id, "items": items,
                                          "resp": resp, "size": size})
                await self._sweep(conn, _SWEEP_BATCH)
                if self.bounds.max_bytes_per_owner is not None:
                    await self._evict_own(conn, owner, rid, size)
                elif self.bounds.max_bytes is not None:
                    cur = await conn.execute("SELECT total_bytes FROM glmserve_meta WHERE k = 1")
                    if (await cur.fetchone())[0] > self.bounds.max_bytes:
                        await self._evict(conn, rid, self.bounds.max_bytes)

        await self._run("store a response", write)

    async def _sweep(self, conn: psycopg.AsyncConnection[Any], limit: int | None) -> None:
        """Delete up to ``limit`` (None: all) expired responses (anyone's: they are gone for everyone)."""
        if self.bounds.ttl:
            await conn.execute(
                "DELETE FROM glmserve_responses WHERE id IN (SELECT id FROM glmserve_responses"
                f" WHERE created_at < {_NOW} - %(ttl)s ORDER BY created_at LIMIT %(n)s)", {"ttl": self._ttl, "n": limit})

    async def _evict_own(self, conn: psycopg.AsyncConnection[Any], owner: str, keep: str, size: int) -> None:
        """Shares: delete ``owner``'s own oldest responses (never ``keep``, the one just
        stored) until it is within its share and the store within its bound; StoreFull (the
        transaction rolls back) when that cannot be done.  The insert's trigger holds the
        meta row's lock, so the totals read here cannot move under it."""
        async def excess() -> int:
            total, owned = await (await conn.execute(
                "SELECT (SELECT total_bytes FROM glmserve_meta WHERE k = 1),"
                " (SELECT total_bytes FROM glmserve_owners WHERE owner = %s)", (owner,))).fetchone()
            return self.bounds.own_excess(total, owned, size)

        try:
            over = await excess()
        except StoreFull:
            await self._sweep(conn, None)  # expired responses beyond the usual batch may be what fills it
            over = await excess()
        while over > 0:
            oldest = await (await conn.execute(
                "SELECT id, size FROM glmserve_responses WHERE owner = %s AND id <> %s ORDER BY created_at, id"
                " LIMIT %s", (owner, keep, _EVICT_BATCH))).fetchall()
            await conn.execute("DELETE FROM glmserve_responses WHERE id = ANY(%s)", (just_enough(oldest, over),))
            over = await excess()

    @staticmethod
    async def _evict(conn: psycopg.AsyncConnection[Any], keep: str, max_bytes: int) -> None:
        """No shares: delete the oldest responses of any owner (never ``keep``, the one just
        stored) until the total is within ``max_bytes`` (the caller holds the meta row's lock)."""
        while True:
            total = (await (await conn.execute("SELECT total_bytes FROM glmserve_meta WHERE k = 1")).fetchone())[0]
            if total <= max_bytes:
                return
            oldest = await (await conn.execute(
                "SELECT id, size FROM glmserve_responses WHERE id <> %s ORDER BY created_at, id LIMIT %s",
                (keep, _EVICT_BATCH))).fetchall()
            if not oldest:
                return
            await conn.execute("DELETE FROM glmserve_responses WHERE id = ANY(%s)",
                               (just_enough(oldest, total - max_bytes),))

    async def get(self, owner: str, response_id: str) -> Stored | None:
        async def read(conn: psycopg.AsyncConnection[Any]) -> Stored | None:
            cur = await conn.execute(
                "SELECT response, input_items, previous_response_id FROM glmserve_responses"
                f" WHERE id = %(id)s AND owner = %(owner)s AND {_LIVE}",
                {"id": response_id, "owner": owner, "ttl": self._ttl})
            row = await cur.fetchone()
            return None if row is None else Stored(json.loads(row[0]), json.loads(row[1]), row[2])

        return await self._run("read a response", read)

    async def delete(self, owner: str, response_id: str) -> bool:
        async def remove(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                await conn.execute("SELECT total_bytes FROM glmserve_meta WHERE k = 1 FOR UPDATE")
                cur = await conn.execute(f"DELETE FROM glmserve_responses WHERE id = %(id)s AND owner = %(owner)s"
                                         f" AND {_LIVE}", {"id": response_id, "owner": owner, "ttl": self._ttl})
                return cur.rowcount

        return await self._run("delete a response", remove) > 0

    async def history(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        async def chain(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]] | None:
            cur = await conn.execute(_CHAIN, {"id": response_id, "owner": owner, "ttl": self._ttl, "max": MAX_CHAIN})
            return assemble_history(response_id, await cur.fetchall())

        return await self._run("read a conversation", chain)

    async def check(self) -> None:
        async def ping(conn: psycopg.AsyncConnection[Any]) -> None:
            # every table (one dropped under the server shows here, and is created again), and
            # writable: a replica whose database became a read-only standby cannot store
            cur = await conn.execute("SELECT (SELECT total_bytes FROM glmserve_meta WHERE k = 1),"
                                     " (SELECT 1 FROM glmserve_owners LIMIT 1), (SELECT 1 FROM glmserve_responses LIMIT 1),"
                                     " current_setting('transaction_read_only')")
            if (await cur.fetchone())[3] == "on":
                raise StoreUnavailable(f"the response store ({self.describe()}) is read-only (a standby?)")

        await self._run("answer a health check", ping)

    async def total_bytes(self) -> int:
        async def total(conn: psycopg.AsyncConnection[Any]) -> int:
            return int((await (await conn.execute("SELECT total_bytes FROM glmserve_meta WHERE k = 1")).fetchone())[0])

        return await self._run("count bytes", total)

    async def owner_bytes(self, owner: str) -> int:
        async def owned(conn: psycopg.AsyncConnection[Any]) -> int:
            row = await (await conn.execute("SELECT total_bytes FROM glmserve_owners WHERE owner = %s",
                                            (owner,))).fetchone()
            return int(row[0]) if row else 0

        return await self._run("count bytes", owned)

    async def start(self) -> None:
        """Open the pool and create or migrate the schema now; a database that is down is
        logged (``/health`` says so) and retried on use."""
        try:
            await self.check()
        except StoreUnavailable as exc:
            log.error("%s", exc)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
