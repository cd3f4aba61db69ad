"""The Responses store behind the real app (scripted engine, real HTTP, the real ``openai``
SDK), on both backends (a SQLite file, a real PostgreSQL: tests/postgres.py):

* one API key's writes evict only its own responses (``--responses-max-bytes-per-key``, by
  default the bound divided among the keys): another key posting many large inputs never makes
  a stored response 404 or its ``previous_response_id`` 400;
* every failure of the database, whatever the driver raises (a corrupt SQLite file, a
  PostgreSQL that became a read-only standby), is a 503 ``store_unavailable`` with
  ``Retry-After`` on create and GET, and ``/health`` is 503 -- then works again, no restart;
* a schema dropped under the server comes back with the next request.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

KEYS = ["key-a", "key-b"]
_names = itertools.count()


def turns(prompt: str, params: Any) -> list[str]:
    """The answer says how many user turns the prompt holds (so the history shows)."""
    return [f"Counting.</think>turns={len(re.findall(r'<[|]user[|]>', prompt))}"]


class App(ThreadServer):
    def __init__(self, db: str, **settings: Any) -> None:
        super().__init__(create_app(ScriptedEngine(turns, model_name="m", max_model_len=200_000), get_format("glm47"),
                                    Settings(api_keys=KEYS, responses_db=db, responses_db_timeout=3.0, **settings)))

    def client(self, key: str = KEYS[0]) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=30)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """``(kind, where)``: a fresh SQLite file's path or PostgreSQL database's URL."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "r.sqlite3")
    return "postgres", request.getfixturevalue("postgres").fresh_database(f"faults_{next(_names)}")


def test_one_key_cannot_evict_another_keys_responses(backend):
    _, where = backend
    app = App(where, responses_max_bytes=96 * 1024)  # two keys: 48 KiB each
    try:
        a, b = app.client(KEYS[0]), app.client(KEYS[1])
        r1 = a.responses.create(model="m", input="first")
        r2 = a.responses.create(model="m", input="second", previous_response_id=r1.id)
        flood = [b.responses.create(model="m", input=f"{k} " + "x" * 6000) for k in range(40)]  # 240 KB
        for r in (r1, r2):  # key A's responses are all there
            assert a.responses.retrieve(r.id).model_dump() == r.model_dump()
        assert a.responses.create(model="m", input="third", previous_response_id=r2.id).output_text == "turns=3"
        assert b.responses.retrieve(flood[-1].id).id == flood[-1].id  # B keeps its newest ...
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(flood[0].id)  # ... having evicted its own oldest
        # a response larger than a key's share is refused, and evicts nothing
        with pytest.raises(openai.APIStatusError) as e:
            b.responses.create(model="m", input="y" * 60_000)
        assert e.value.status_code == 507 and e.value.body["code"] == "store_full"
        assert b.responses.retrieve(flood[-1].id).id == flood[-1].id
        assert a.responses.retrieve(r2.id).id == r2.id
    finally:
        app.stop()


def assert_unavailable(app: App) -> None:
    """A 503 store_unavailable with Retry-After on create, GET and /health (and no 500)."""
    for call in (lambda c: c.responses.create(model="m", input="x"),
                 lambda c: c.responses.retrieve("resp_nope"),
                 lambda c: c.responses.create(model="m", input="x", previous_response_id="resp_nope")):
        with pytest.raises(openai.APIStatusError) as e:
            call(app.client())
        assert e.value.status_code == 503 and e.value.body["code"] == "store_unavailable", e.value.body
        assert e.value.response.headers["retry-after"]
    h = app.health()
    assert h.status_code == 503 and h.json()["error"]["code"] == "store_unavailable" and h.headers["retry-after"]


def test_every_store_failure_is_a_503_then_recovers(backend):
    kind, where = backend
    if kind == "sqlite":  # a file that is not a database
        Path(where).write_bytes(b"garbage, not a SQLite database " * 300)

        def repair() -> None:
            Path(where).rename(where + ".corrupt")  # the operator moves it away
    else:  # the database became a read-only standby (writes raise InternalError)
        import psycopg

        name = where.rsplit("/", 1)[1]
        admin = where.rsplit("/", 1)[0] + "/postgres"

        def read_only(on: bool) -> None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

        read_only(True)

        def repair() -> None:
            read_only(False)
    app = App(where)
    try:
        if kind == "postgres":  # reads still work on a standby: the write and the health check fail
            with pytest.raises(openai.APIStatusError) as e:
                app.client().responses.create(model="m", input="x")
            assert e.value.status_code == 503 and e.value.body["code"] == "store_unavailable"
            assert e.value.response.headers["retry-after"]
            h = app.health()
            assert h.status_code == 503 and h.json()["error"]["code"] == "store_unavailable"
        else:
            assert_unavailable(app)
        assert app.client().responses.create(model="m", input="x", store=False).output_text == "turns=1"
        repair()
        deadline = time.monotonic() + 60  # PostgreSQL: the pool replaces the terminated connections
        while app.health().status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        r = app.client().responses.create(model="m", input="again")
        assert app.client().responses.retrieve(r.id).id == r.id
        assert app.health().status_code == 200
    finally:
        app.stop()


def test_a_dropped_schema_comes_back_without_a_restart(backend):
    kind, where = backend
    app = App(where)
    try:
        r1 = app.client().responses.create(model="m", input="one")
        if kind == "sqlite":
            with sqlite3.connect(where, isolation_level=None) as db:
                db.execute("DROP TABLE responses")
        else:
            import psycopg

            with psycopg.connect(where, autocommit=True) as conn:
                conn.execute("DROP TABLE glmserve_responses")
        with pytest.raises(openai.NotFoundError):
            app.client().responses.retrieve(r1.id)  # gone with the table: a 404, not a 500
        r2 = app.client().responses.create(model="m", input="two")
        r3 = app.client().responses.create(model="m", input="three", previous_response_id=r2.id)
        assert r3.output_text == "turns=2"
        assert app.health().status_code == 200
    finally:
        app.stop()
