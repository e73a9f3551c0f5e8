"""The connection to the service's database, whichever engine holds it.

SQLite (the embedded default): one file in the store's folder, WAL journal with
synchronous=FULL, so a transaction that returned is on disk and a request
acknowledged with 200 survives a kill right after; every write transaction is BEGIN
IMMEDIATE, so the processes of one host serialise their writes. PostgreSQL
(`CDM_DATABASE_URL=postgresql://...`): the database many hosts share; what SQLite's
single writer gave for free (two admissions of one key never both pass its limit,
one migrator at a time) is an advisory transaction lock (`lock`).

The schema is Alembic's (service/migrations): every open brings the database to the
newest revision, SQLite and Postgres alike, and a database made before migrations
existed is brought to the baseline in place. Statements are SQLAlchemy `text()` with
named parameters, written in the SQL both engines speak.

Errors that mean the database cannot be used now (refused or lost connection, wrong
credentials, a lock held past the timeout) become `DatabaseUnavailable` (HTTP 503
with Retry-After); anything else is a bug and propagates as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from shards.coordination import PG_CONNECT, psycopg_url, reason, unavailable
from shards.settings import DATABASE_ENV

from .errors import DatabaseUnavailable

log = logging.getLogger(__name__)

DB_FILE = "service.db"  # the SQLite file, in the store's folder
REVISION = "0001"  # the newest migration (service/migrations/versions)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_S = 30  # a writer waits this long for another's lock before giving up (503)


def database_url(store_root: str | Path) -> str:
    """Where the records of the store at `store_root` live: CDM_DATABASE_URL when set,
    else the SQLite file service.db in the store's folder."""
    return os.environ.get(DATABASE_ENV) or str(Path(store_root) / DB_FILE)


def _url(where: str | Path | sa.URL) -> sa.URL:
    """A SQLAlchemy URL from a URL or a SQLite file path; postgresql:// means psycopg 3."""
    if isinstance(where, sa.URL):
        return where
    text = str(where)
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text)))
    try:
        url = psycopg_url(text)
    except sa.exc.ArgumentError:
        raise ValueError(f"{DATABASE_ENV}: not a database URL: {text!r}") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"{DATABASE_ENV}: {url.get_backend_name()!r} databases are not "
                         "supported; use postgresql://user:password@host/db (or unset it: "
                         "SQLite in the store's folder)")
    return url


class SQL:
    """One database: an engine with a small connection pool, shared by the threads of
    a process. Writes go through `transaction()`; reads run in autocommit."""

    def __init__(self, where: str | Path | sa.URL):
        self.url = _url(where)
        self.sqlite = self.url.get_backend_name() == "sqlite"
        self.path = Path(self.url.database) if self.sqlite else None
        # as the user wrote it (postgresql://, not the driver's name), without the password
        self.where = self.url.set(drivername=self.url.get_backend_name()).render_as_string(
            hide_password=True)
        if self.sqlite:
            self.engine = sa.create_engine(self.url, pool_size=8, max_overflow=56,
                                           connect_args={"timeout": SQLITE_BUSY_S})
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        else:
            # 5 kept + 10 under load per process: hosts x workers x ~17 connections in all
            self.engine = sa.create_engine(self.url, pool_size=5, max_overflow=10,
                                           pool_pre_ping=True, connect_args=PG_CONNECT)
        sa.event.listen(self.engine, "handle_error", self._unavailable)
        self._reader = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.migrate()

    def _unavailable(self, ctx) -> None:
        if ctx.is_pre_ping:  # a stale pooled connection: the pool discards it and reconnects
            return
        if unavailable(ctx.original_exception, ctx.is_disconnect):
            raise DatabaseUnavailable(f"database {self.where} unavailable: "
                                      f"{reason(ctx.original_exception)}") from ctx.original_exception

    # ------------------------------------------------------------ statements
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction (committed on leaving, rolled back on an exception);
        yields the connection, which the methods that take `db=` accept so that
        several writes commit together."""
        with self.engine.begin() as conn:
            yield conn

    def rows(self, sql: str, db: Connection | None = None, **params) -> list[RowMapping]:
        """Rows of a query, in `db`'s transaction or on their own (autocommit)."""
        if db is not None:
            return list(db.execute(sa.text(sql), params).mappings())
        with self._reader.connect() as conn:
            return list(conn.execute(sa.text(sql), params).mappings())

    def row(self, sql: str, db: Connection | None = None, **params) -> RowMapping | None:
        found = self.rows(sql, db, **params)
        return found[0] if found else None

    def write(self, sql: str, db: Connection, params: dict | list[dict] | None = None) -> int:
        """Run a statement in `db`'s transaction (for a list of parameter sets, once
        per set); returns the rows it changed."""
        statement = sa.text(sql)
        if isinstance(params, list):
            return db.execute(statement, params).rowcount if params else 0
        return db.execute(statement, params or {}).rowcount

    def lock(self, db: Connection, name: str) -> None:
        """Hold the lock `name` until `db`'s transaction ends. SQLite: its write
        transaction already excludes every other writer."""
        if not self.sqlite:
            db.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"),
                       {"name": name})

    # ------------------------------------------------------------ migrations
    def revision(self) -> str | None:
        """The database's schema revision (None: never migrated)."""
        if not sa.inspect(self._reader).has_table("alembic_version"):
            return None
        return self.row("SELECT version_num FROM alembic_version")["version_num"]

    def migrate(self) -> None:
        """Bring the schema to `REVISION` (a no-op when it is there), one process at a
        time."""
        if self.revision() == REVISION:
            return
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.transaction() as db:
            self.lock(db, "cdm-serve migrations")
            config.attributes["connection"] = db
            try:
                command.upgrade(config, "head")
            except CommandError as err:  # a revision this code does not know: newer code's
                raise DatabaseUnavailable(
                    f"database {self.where} is at schema revision {self.revision()!r}, which "
                    f"this version of cdm-serve (revision {REVISION}) does not know: upgrade "
                    f"cdm-serve on this host ({reason(err)})") from None

    def listen(self, channel: str, notified, stop: threading.Event) -> None:
        """Call `notified(payload)` for every NOTIFY on `channel` until `stop` is set
        (Postgres; run in a thread of its own). After each (re)connection it calls
        `notified(None)`: what was sent while it was away is for a refresh to find."""
        import psycopg

        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, **PG_CONNECT) as conn:
                    conn.execute(f"LISTEN {channel}")
                    notified(None)
                    while not stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            notified(note.payload)
            except psycopg.Error as err:
                log.warning("listening for %s on %s: %s; again in 1 s", channel, self.where,
                            reason(err))
                stop.wait(1.0)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # the driver opens no transaction; `_sqlite_begin` does
    for pragma in ("journal_mode=WAL", "synchronous=FULL", f"busy_timeout={SQLITE_BUSY_S * 1000}"):
        dbapi_conn.execute(f"PRAGMA {pragma}")


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
