"""The Responses store's two backends against the same contract: SQLite (a file) and
PostgreSQL (a real server the suite starts, tests/postgres.py).

Each test gets a fresh store; rows are aged by rewriting ``created_at`` in the database (no
sleeps), so expiry is deterministic.  The PostgreSQL-only tests stop and restart the server
itself to show a clear failure within the timeout and recovery without a new store.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from glmserve.api.responses.store import Bounds, ChainBroken, ResponseStore, StoreFull, StoreUnavailable, encode
from glmserve.api.responses.store_factory import open_store
from glmserve.api.responses.store_postgres import PostgresStore, describe_url
from glmserve.api.responses.store_sqlite import SQLiteStore

pytestmark = pytest.mark.asyncio
_names = itertools.count()


def response(rid: str, text: str = "hi", pad: int = 0) -> dict[str, Any]:
    return {"id": rid, "object": "response", "output": [
        {"type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": text + "x" * pad, "annotations": []}]}]}


def user(text: str) -> list[dict[str, Any]]:
    return [{"type": "message", "role": "user", "content": text}]


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request, tmp_path):
    """``make_store(bounds=..., timeout=...)``: a fresh, empty store of the backend; a second
    call gives another connection to the same database (another replica)."""
    if request.param == "sqlite":
        where = str(tmp_path / "r.sqlite3")
    else:
        where = request.getfixturevalue("postgres").fresh_database(f"store_{next(_names)}")

    def make(bounds: Bounds | None = None, timeout: float = 5.0) -> ResponseStore:
        return open_store(where, bounds or Bounds(), timeout)

    return make  # a store's pool belongs to the test's event loop: each test closes its own stores


async def age(store: ResponseStore, rid: str, seconds: float) -> None:
    """Make ``rid`` look ``seconds`` older than it is."""
    if isinstance(store, SQLiteStore):
        def do() -> None:
            with store._lock:
                store._db.execute("UPDATE responses SET created_at = created_at - ? WHERE id = ?", (seconds, rid))
        await asyncio.to_thread(do)
    else:
        async def do(conn):
            await conn.execute("UPDATE glmserve_responses SET created_at = created_at - %s WHERE id = %s",
                               (seconds, rid))
        await store._run("age", do)


async def ids(store: ResponseStore) -> set[str]:
    if isinstance(store, SQLiteStore):
        def do() -> set[str]:
            with store._lock:
                return {r[0] for r in store._db.execute("SELECT id FROM responses")}
        return await asyncio.to_thread(do)

    async def q(conn):
        return {r[0] for r in await (await conn.execute("SELECT id FROM glmserve_responses")).fetchall()}
    return await store._run("list", q)


async def summed(store: ResponseStore) -> int:
    if isinstance(store, SQLiteStore):
        def do() -> int:
            with store._lock:
                return store._db.execute("SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()[0]
        return await asyncio.to_thread(do)

    async def q(conn):
        return (await (await conn.execute("SELECT COALESCE(SUM(size), 0) FROM glmserve_responses")).fetchone())[0]
    return int(await store._run("sum", q))


async def test_chain_owner_get_delete(make_store):
    store = make_store()
    try:
        await store.put("k1", response("resp_1", "one"), user("hello"), None)
        await store.put("k1", response("resp_2", "two"), user("again"), "resp_1")
        await store.put("k1", response("resp_3", "three"), user("more"), "resp_2")
        got = await store.get("k1", "resp_2")
        assert got.response == response("resp_2", "two") and got.previous_response_id == "resp_1"
        assert got.input_items == user("again")
        assert await store.get("k2", "resp_2") is None  # another key sees nothing
        history = await store.history("k1", "resp_3")
        assert [i.get("content") for i in history if i["role"] == "user"] == ["hello", "again", "more"]
        assert [i["content"][0]["text"] for i in history if i["role"] == "assistant"] == ["one", "two", "three"]
        assert await store.history("k2", "resp_3") is None
        assert await store.history("k1", "resp_nope") is None
        assert not await store.delete("k2", "resp_1")
        assert await store.delete("k1", "resp_1")
        assert not await store.delete("k1", "resp_1")
        with pytest.raises(ChainBroken, match="resp_1"):
            await store.history("k1", "resp_3")
        await store.check()
        assert await store.total_bytes() == await summed(store) > 0
    finally:
        await store.close()


async def test_ttl_hides_then_sweeps_expired_responses(make_store):
    store = make_store(Bounds(ttl=3600, max_bytes=None))
    try:
        await store.put("k", response("resp_old"), user("a"), None)
        await store.put("k", response("resp_new"), user("b"), "resp_old")
        await age(store, "resp_old", 3601)
        assert await store.get("k", "resp_old") is None  # expired: invisible at once
        assert not await store.delete("k", "resp_old")
        with pytest.raises(ChainBroken, match="deleted or expired"):
            await store.history("k", "resp_new")
        assert "resp_old" in await ids(store)
        await store.put("k", response("resp_next"), user("c"), None)  # a write sweeps it
        assert await ids(store) == {"resp_new", "resp_next"}
        assert await store.total_bytes() == await summed(store)
    finally:
        await store.close()


async def test_no_ttl_keeps_old_responses(make_store):
    store = make_store(Bounds(ttl=None, max_bytes=None))
    try:
        await store.put("k", response("resp_old"), user("a"), None)
        await age(store, "resp_old", 10 * 365 * 86400)
        await store.put("k", response("resp_new"), user("b"), None)
        assert (await store.get("k", "resp_old")).response["id"] == "resp_old"
    finally:
        await store.close()


async def test_size_bound_evicts_the_oldest(make_store):
    size = encode(response("resp_0"), user("q"))[2]
    store = make_store(Bounds(ttl=None, max_bytes=3 * size))
    try:
        for i in range(5):
            await store.put("k", response(f"resp_{i}"), user("q"), None)
            await age(store, f"resp_{i}", 100 - i)  # distinct ages: resp_0 is the oldest
        assert await ids(store) == {"resp_2", "resp_3", "resp_4"}
        assert await store.total_bytes() == await summed(store) == 3 * size
        # replacing a row counts its new size, not both
        await store.put("k", response("resp_4", pad=0), user("q"), None)
        assert await store.total_bytes() == 3 * size
        # one response larger than the bound is kept (it is the newest) and the rest go
        await store.put("k", response("resp_big", pad=4 * size), user("q"), None)
        assert await ids(store) == {"resp_big"}
        assert await store.total_bytes() == await summed(store)
        assert await store.delete("k", "resp_big")
        assert await store.total_bytes() == 0
    finally:
        await store.close()


async def test_two_connections_share_one_store(make_store):
    """Two stores on one database (two replicas): what one writes the other reads, and
    concurrent writers under a size bound keep the byte total exact."""
    size = encode(response("resp_a00"), user("q"))[2]
    a, b = make_store(Bounds(ttl=3600, max_bytes=20 * size)), make_store(Bounds(ttl=3600, max_bytes=20 * size))
    try:
        await a.put("k", response("resp_x"), user("q"), None)
        assert (await b.get("k", "resp_x")).response["id"] == "resp_x"
        assert await b.delete("k", "resp_x")
        assert await a.get("k", "resp_x") is None

        async def writer(s: ResponseStore, name: str) -> None:
            for i in range(30):
                await s.put("k", response(f"resp_{name}{i:02d}"), user("q"), None)
                if i in (3, 7):
                    await s.delete("k", f"resp_{name}{i - 1:02d}")

        await asyncio.gather(writer(a, "a"), writer(b, "b"), writer(a, "c"), writer(b, "d"))
        assert await a.total_bytes() == await summed(a) <= 20 * size
        assert len(await ids(a)) == 20  # every id is as long, so the bound holds exactly 20
    finally:
        await a.close()
        await b.close()


async def test_shares_evict_only_the_writers_own(make_store):
    """With per-owner shares a write evicts only its owner's oldest responses: another key
    flooding the store never touches k1's, the global bound still holds, and a response that
    would need another owner's room is refused with nothing stored or evicted."""
    size = encode(response("resp_a0"), user("q"))[2]  # every id below is as long
    store = make_store(Bounds(ttl=None, max_bytes=6 * size, max_bytes_per_owner=4 * size))
    try:
        await store.put("k1", response("resp_a0"), user("q"), None)
        for i in range(1, 4):
            await store.put("k1", response(f"resp_a{i}"), user("q"), f"resp_a{i - 1}")
        for i in range(10):  # k2 floods: the store has room for two of its responses
            await store.put("k2", response(f"resp_b{i}"), user("q"), None)
        assert await ids(store) == {"resp_a0", "resp_a1", "resp_a2", "resp_a3", "resp_b8", "resp_b9"}
        assert len(await store.history("k1", "resp_a3")) == 8  # k1's whole chain is there
        assert (await store.owner_bytes("k1"), await store.owner_bytes("k2")) == (4 * size, 2 * size)
        # k1's own share: its new responses evict its own oldest, not k2's
        await store.put("k1", response("resp_a4"), user("q"), "resp_a3")
        assert await ids(store) == {"resp_a1", "resp_a2", "resp_a3", "resp_a4", "resp_b8", "resp_b9"}
        before = await ids(store)
        with pytest.raises(StoreFull, match="other API keys hold"):  # k3 has nothing of its own to evict
            await store.put("k3", response("resp_c0"), user("q"), None)
        with pytest.raises(StoreFull, match="larger than an API key's share"):
            await store.put("k2", response("resp_b10", pad=4 * size), user("q"), None)
        assert await ids(store) == before and await store.owner_bytes("k3") == 0
        assert await store.delete("k2", "resp_b8")
        await store.put("k3", response("resp_c0"), user("q"), None)  # room again
        assert await store.total_bytes() == await summed(store) == 6 * size
        assert (await store.owner_bytes("k1"), await store.owner_bytes("k2"), await store.owner_bytes("k3")) == \
            (4 * size, size, size)
    finally:
        await store.close()


async def drop_schema(store: ResponseStore) -> None:
    """Another client drops glmserve's tables (an operator's mistake, a restore of an empty dump)."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path, isolation_level=None) as db:
            for table in ("responses", "store_meta", "store_owners"):
                db.execute(f"DROP TABLE {table}")
        return
    import psycopg

    async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
        await conn.execute("DROP TABLE glmserve_responses, glmserve_meta, glmserve_owners CASCADE")
        await conn.execute("DROP FUNCTION glmserve_account")


async def test_a_schema_dropped_under_the_store_comes_back(make_store):
    """The tables vanish while the store is open: the next operation (whichever) creates
    them again and succeeds, with no restart; what was stored is gone, the totals are right."""
    store = make_store()
    try:
        await store.put("k", response("resp_1"), user("q"), None)
        for op in ("put", "get", "check"):
            await drop_schema(store)
            if op == "put":
                await store.put("k", response("resp_2"), user("q"), "resp_1")
                assert (await store.get("k", "resp_2")).previous_response_id == "resp_1"
            elif op == "get":
                assert await store.get("k", "resp_2") is None
            else:
                await store.check()
            await store.put("k", response("resp_3"), user("q"), None)
            assert await store.total_bytes() == await summed(store) == await store.owner_bytes("k") > 0
    finally:
        await store.close()


async def corrupt_row(store: ResponseStore, rid: str) -> None:
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path, isolation_level=None) as db:
            db.execute("UPDATE responses SET response = '{not json' WHERE id = ?", (rid,))
        return
    import psycopg

    async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
        await conn.execute("UPDATE glmserve_responses SET response = '{not json' WHERE id = %s", (rid,))


async def test_an_unreadable_row_is_unavailable_not_a_crash(make_store):
    store = make_store()
    try:
        await store.put("k", response("resp_1"), user("q"), None)
        await store.put("k", response("resp_2"), user("q"), "resp_1")
        await corrupt_row(store, "resp_1")
        for op in (store.get("k", "resp_1"), store.history("k", "resp_2")):
            with pytest.raises(StoreUnavailable, match="resp|JSON|Expecting|unreadable"):
                await op
        assert (await store.get("k", "resp_2")).previous_response_id == "resp_1"
    finally:
        await store.close()


# --------------------------------------------------------------------------- SQLite only


async def test_sqlite_files_are_private(tmp_path):
    path = tmp_path / "new" / "dir" / "r.sqlite3"
    old = os.umask(0o022)
    try:
        store = SQLiteStore(path)
        await store.put("k", response("resp_1"), user("q"), None)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        await store.close()
        os.chmod(path, 0o644)  # a file an older glmserve left world-readable is tightened
        store = SQLiteStore(path)
        assert await store.get("k", "resp_1") is not None
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        await store.close()
    finally:
        os.umask(old)


async def test_sqlite_schema_1_is_migrated(tmp_path):
    """A file written by the previous glmserve (no size column) keeps its responses."""
    path = tmp_path / "r.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,"
                   " previous_response_id TEXT, input_items TEXT NOT NULL, response TEXT NOT NULL)")
        resp, items, size = encode(response("resp_1"), user("q"))
        db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?)", ("resp_1", "k", time.time(), None, items, resp))
        db.execute("PRAGMA user_version=1")
    store = SQLiteStore(path)
    try:
        assert (await store.get("k", "resp_1")).response == response("resp_1")
        assert await store.total_bytes() == size
        await store.put("k", response("resp_2"), user("q"), "resp_1")
        assert len(await store.history("k", "resp_2")) == 4
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


async def test_sqlite_corrupt_file_is_unavailable_until_replaced(tmp_path):
    """A file that is not a database: every operation, the health check included, is
    StoreUnavailable (never another exception); once the operator moves it away, the same
    store creates a fresh one."""
    path = tmp_path / "r.sqlite3"
    path.write_bytes(b"this is not a SQLite database, it is garbage " * 200)
    store = SQLiteStore(path)
    try:
        for op in (store.put("k", response("resp_1"), user("q"), None), store.get("k", "resp_1"),
                   store.history("k", "resp_1"), store.delete("k", "resp_1"), store.check()):
            with pytest.raises(StoreUnavailable, match="not a database"):
                await op
        path.rename(tmp_path / "r.sqlite3.corrupt")
        await store.put("k", response("resp_1"), user("q"), None)
        assert (await store.get("k", "resp_1")).response == response("resp_1")
    finally:
        await store.close()


async def test_sqlite_schema_2_gets_owner_totals(tmp_path):
    """A file of a glmserve without per-owner totals gets them, counted from what is there."""
    path = tmp_path / "r.sqlite3"
    sizes = {}
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,"
                   " previous_response_id TEXT, input_items TEXT NOT NULL, response TEXT NOT NULL,"
                   " size INTEGER NOT NULL DEFAULT 0)")
        db.execute("CREATE TABLE store_meta (k INTEGER PRIMARY KEY CHECK (k = 1), total_bytes INTEGER NOT NULL)")
        db.execute("CREATE TRIGGER responses_added AFTER INSERT ON responses BEGIN"
                   " UPDATE store_meta SET total_bytes = total_bytes + NEW.size WHERE k = 1; END")
        db.execute("CREATE TRIGGER responses_removed AFTER DELETE ON responses BEGIN"
                   " UPDATE store_meta SET total_bytes = total_bytes - OLD.size WHERE k = 1; END")
        db.execute("CREATE TRIGGER responses_changed AFTER UPDATE OF size ON responses BEGIN"
                   " UPDATE store_meta SET total_bytes = total_bytes - OLD.size + NEW.size WHERE k = 1; END")
        db.execute("INSERT INTO store_meta VALUES (1, 0)")
        for rid, owner in (("resp_1", "k1"), ("resp_2", "k2"), ("resp_3", "k1")):
            resp, items, size = encode(response(rid, pad=len(owner) * 10), user("q"))
            sizes[owner] = sizes.get(owner, 0) + size
            db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (rid, owner, time.time(), None, items, resp, size))
        db.execute("PRAGMA user_version=2")
    store = SQLiteStore(path)
    try:
        assert (await store.owner_bytes("k1"), await store.owner_bytes("k2")) == (sizes["k1"], sizes["k2"])
        assert await store.total_bytes() == sum(sizes.values())
        await store.put("k2", response("resp_3"), user("q"), None)  # replaced by k2: both owners' totals move
        assert await store.owner_bytes("k1") + await store.owner_bytes("k2") == await store.total_bytes() == \
            await summed(store)
        assert await store.owner_bytes("k1") == sizes["k1"] - encode(response("resp_3", pad=20), user("q"))[2]
    finally:
        await store.close()


async def test_sqlite_unwritable_is_unavailable(tmp_path):
    (tmp_path / "f").write_text("not a directory")
    store = SQLiteStore(tmp_path / "f" / "r.sqlite3")
    with pytest.raises(StoreUnavailable):
        await store.put("k", response("resp_1"), user("q"), None)


# --------------------------------------------------------------------------- PostgreSQL only


async def test_urls_are_logged_without_passwords():
    assert describe_url("postgresql://u:secret@db.example:6543/app") == "PostgreSQL db.example:6543/app"
    assert "secret" not in open_store("postgresql://u:secret@h/x").describe()
    assert isinstance(open_store("postgres://h/x"), PostgresStore)


async def test_postgres_replicas_create_the_schema_together(postgres):
    url = postgres.fresh_database(f"store_{next(_names)}")
    stores = [PostgresStore(url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.start() for s in stores))
        await asyncio.gather(*(s.check() for s in stores))
        await stores[0].put("k", response("resp_1"), user("q"), None)
        assert (await stores[3].get("k", "resp_1")) is not None
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_postgres_down_is_a_clear_failure_then_recovers(postgres):
    """Stopped mid-run: every operation fails within the bound with StoreUnavailable (no
    hang, no success), and the same store works again once the server is back."""
    url = postgres.fresh_database(f"store_{next(_names)}")
    store = PostgresStore(url, timeout=1.0)
    try:
        await store.put("k", response("resp_1"), user("q"), None)
        await asyncio.to_thread(postgres.stop)
        try:
            for op in (store.put("k", response("resp_2"), user("q"), "resp_1"), store.get("k", "resp_1"),
                       store.history("k", "resp_1"), store.delete("k", "resp_1"), store.check()):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await op
                assert time.monotonic() - t0 < 3 * 1.0 + 2
        finally:
            await asyncio.to_thread(postgres.start)
        await store.check()
        assert (await store.get("k", "resp_1")).response["id"] == "resp_1"
        assert await store.get("k", "resp_2") is None  # the failed put stored nothing
        await store.put("k", response("resp_3"), user("q"), "resp_1")
        assert len(await store.history("k", "resp_3")) == 4
    finally:
        await store.close()


async def test_postgres_down_at_start_up(postgres):
    """A replica started while the database is down serves 503s, then recovers (and creates
    the schema) once it is up."""
    url = postgres.fresh_database(f"store_{next(_names)}")
    await asyncio.to_thread(postgres.stop)
    store = PostgresStore(url, timeout=1.0)
    try:
        try:
            await store.start()  # logs, does not raise
            with pytest.raises(StoreUnavailable):
                await store.check()
        finally:
            await asyncio.to_thread(postgres.start)
        await store.put("k", response("resp_1"), user("q"), None)
        assert (await store.get("k", "resp_1")) is not None
    finally:
        await store.close()


async def test_postgres_read_only_standby_is_unavailable_then_recovers(postgres):
    """After a failover the store's connections land on a read-only standby: writes raise
    the driver's InternalError (ReadOnlySqlTransaction), which is StoreUnavailable like any
    other failure, and the health check says so too; back on a primary, all works."""
    import psycopg

    name = f"store_{next(_names)}"
    url = postgres.fresh_database(name)
    store = PostgresStore(url, timeout=3.0)

    async def read_only(on: bool) -> None:
        async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as conn:
            await conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    async def once_connected(op):
        """``op()``'s outcome once the pool has reconnected (the old connections were terminated:
        a replacement can take longer than the timeout on a loaded machine)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return await op(), None
            except StoreUnavailable as exc:
                if "no connection" not in str(exc) or time.monotonic() > deadline:
                    return None, exc

    try:
        await store.put("k", response("resp_1"), user("q"), None)
        await read_only(True)
        _, failed = await once_connected(lambda: store.put("k", response("resp_2"), user("q"), "resp_1"))
        assert failed is not None and "ReadOnlySqlTransaction" in str(failed)
        _, failed = await once_connected(store.check)
        assert failed is not None and "read-only" in str(failed)
        assert (await once_connected(lambda: store.get("k", "resp_1")))[0] is not None  # reads still answer
        await read_only(False)
        assert (await once_connected(store.check))[1] is None
        await store.put("k", response("resp_2"), user("q"), "resp_1")
        assert len(await store.history("k", "resp_2")) == 4
    finally:
        await store.close()


async def test_postgres_database_recreated_empty(postgres):
    """The database is dropped and created again (empty) under a running store: the next
    operation finds no tables, creates them, and succeeds -- no UndefinedTable until a restart."""
    import psycopg

    name = f"store_{next(_names)}"
    url = postgres.fresh_database(name)
    store = PostgresStore(url, timeout=2.0)
    try:
        await store.put("k", response("resp_1"), user("q"), None)
        async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        assert await store.get("k", "resp_1") is None
        await store.put("k", response("resp_2"), user("q"), "resp_1")
        await store.check()
        assert await store.total_bytes() == await store.owner_bytes("k") == await summed(store) > 0
    finally:
        await store.close()


async def hold_write_lock(store: ResponseStore):
    """Another connection takes the store's write lock and keeps it; returns its release."""
    if isinstance(store, SQLiteStore):
        holder = sqlite3.connect(store.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")

        async def release() -> None:
            holder.close()
        return release
    import psycopg

    conn = await psycopg.AsyncConnection.connect(store.url)
    await conn.execute("SELECT 1 FROM glmserve_meta WHERE k = 1 FOR UPDATE")  # a transaction, left open
    return conn.close


async def test_a_slow_database_is_a_clear_failure(make_store):
    """Another connection holds the write lock (a slow or stuck writer): a write fails within
    the timeout with StoreUnavailable instead of waiting, reads still answer, and once the
    lock is released writes work again."""
    store = make_store(timeout=1.0)
    try:
        await store.put("k", response("resp_1"), user("q"), None)
        release = await hold_write_lock(store)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.put("k", response("resp_2"), user("q"), "resp_1")
        assert time.monotonic() - t0 < 1.0 + 2
        assert (await store.get("k", "resp_1")) is not None
        await release()
        await store.put("k", response("resp_2"), user("q"), "resp_1")
        assert len(await store.history("k", "resp_2")) == 4
    finally:
        await store.close()
