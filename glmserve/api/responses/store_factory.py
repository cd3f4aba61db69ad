"""Which store backend ``--responses-db`` names, opened.

Apart from the contract (:mod:`glmserve.api.responses.store`), which both backends import, so
that nothing the backends import imports them back.
"""

from __future__ import annotations

from pathlib import Path

from glmserve.api.responses.store import DEFAULT_TIMEOUT, Bounds, ResponseStore


def is_postgres_url(spec: str | Path | None) -> bool:
    return isinstance(spec, str) and spec.startswith(("postgresql://", "postgres://"))


def open_store(spec: str | Path | None, bounds: Bounds | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> ResponseStore:
    """The backend ``spec`` names: a ``postgresql://`` URL, else a SQLite file (None: the
    default file under the glmserve cache).  Opening is lazy: nothing connects yet (and the
    PostgreSQL driver is imported only for a URL)."""
    bounds = bounds or Bounds()
    if is_postgres_url(spec):
        from glmserve.api.responses.store_postgres import PostgresStore

        return PostgresStore(str(spec), bounds, timeout)
    from glmserve.api.responses.store_sqlite import SQLiteStore

    return SQLiteStore(spec, bounds, timeout)
