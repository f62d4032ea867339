"""SQLAlchemy engines for the cloud's own tables (catalog, fleet registry).

SQLite is the one-machine default: it gets WAL mode (readers never block the ingest writer,
other processes may read while the coordinator runs), ``synchronous=NORMAL`` (the catalog
and registry can be rebuilt from the object store and the ledger, which are the durable
records, so a commit need not wait for an fsync) and a busy timeout. Other URLs
(PostgreSQL) are used as they are.
"""

from __future__ import annotations

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

__all__ = ["engine_for"]


def engine_for(url_or_engine: str | Engine) -> Engine:
    if isinstance(url_or_engine, Engine):
        return url_or_engine
    engine = create_engine(url_or_engine)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("pragma journal_mode=wal")
            cur.execute("pragma synchronous=normal")
            cur.execute("pragma busy_timeout=10000")
            cur.close()

    return engine
