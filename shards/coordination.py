"""How the processes that open one store exclude each other, and learn of each
other's changes.

One host (the default): `fcntl` locks on files in the store's folder (STORE/.lock,
.admin.lock, .work.lock); another process sees a new manifest at its next
`refresh()` (one `stat`).

Many hosts on one shared store (a volume every host mounts), with the deployment's
database on PostgreSQL (`CDM_DATABASE_URL=postgresql://...`): PostgreSQL advisory
locks instead of files, so no coordination depends on the shared filesystem's
locking; each lock held is a session lock on a connection of its own, so a process
that dies (kill -9, a lost host) releases its locks when its connections drop. Every
manifest commit also sends `NOTIFY cdm_store, '<generation>'`, so the other hosts'
job runners wake and drop a forgotten contributor's weights without polling delays.
What a request may use is still decided by the manifest itself, read fresh at each
request: the shared volume must show a renamed file to the next `open` on any host
(close-to-open consistency, which NFS gives with `lookupcache=positive` or stricter).

Locks are reentrant within a thread and exclusive between threads, as the file
locks are.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from .errors import StoreUnavailableError
from .settings import DATABASE_ENV, env_str

log = logging.getLogger(__name__)

CHANNEL = "cdm_store"  # the NOTIFY channel of manifest commits
# libpq: give up connecting after 10 s; TCP keepalives both ways, so a dead peer (a host
# powered off, a cut network) is noticed in about 25 s, not the kernel's 2 hours
PG_CONNECT = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
              "keepalives_interval": 5, "keepalives_count": 3,
              "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 "
                         "-c tcp_keepalives_count=3"}


# SQLSTATE classes of a database that cannot serve now, whatever the statement:
# connection exceptions, wrong credentials, no such database, a read-only standby after
# failover, insufficient resources, operator intervention (shutdown, cannot connect
# now), a lock not available. Deadlocks and serialization failures are not here: they
# are the code's to handle, not the operator's.
UNAVAILABLE_STATES = ("08", "28", "3D", "25006", "53", "57P", "55P03")


def unavailable(err: BaseException, disconnect: bool = False) -> bool:
    """Whether a DBAPI error means the database cannot be used now (503), not a bug."""
    if disconnect:
        return True
    text = str(err)
    if "database is locked" in text or "unable to open database" in text:  # SQLite
        return True
    state = getattr(err, "sqlstate", None)
    if state is None:  # psycopg: refused, unreachable or cut before the server answered
        return type(err).__name__ == "OperationalError" and type(err).__module__.startswith("psycopg")
    return state.startswith(UNAVAILABLE_STATES)


def reason(err: BaseException) -> str:
    """The first line of a DBAPI error's message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


LOCK_FILES = {"write": ".lock", "admin": ".admin.lock", "work": ".work.lock"}


def psycopg_url(url):
    """A SQLAlchemy URL of `url` (text or URL), postgresql:// or postgres:// through
    psycopg 3 (SQLAlchemy's default PostgreSQL driver is psycopg2)."""
    import sqlalchemy as sa

    url = sa.make_url(url)
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def postgres_url(url: str | None = None) -> str | None:
    """The deployment's database URL when it is PostgreSQL (CDM_DATABASE_URL), else None."""
    url = url if url is not None else env_str(DATABASE_ENV, "")
    return url if url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres") else None


class FileLocks:
    """The store's locks as files in its folder (one host)."""

    kind = "file"

    def __init__(self, root: Path):
        # thread-local: two threads of one process exclude each other
        self._locks = {name: FileLock(root / file, preserve_lock_file=True)
                       for name, file in LOCK_FILES.items()}

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._locks[name]:
            yield

    def check(self) -> None:
        """File locks stay held while the process lives."""

    def committed(self, generation: int) -> None:
        """Other processes stat the manifest; nothing to send."""


class AdvisoryLocks:
    """The store's locks as PostgreSQL session advisory locks (many hosts)."""

    kind = "postgres"
    _held = threading.local()  # per thread: lock key -> (connection, depth)

    def __init__(self, url: str, store_key: str):
        import sqlalchemy as sa

        self.store_key = store_key
        self.where = sa.make_url(url).render_as_string(hide_password=True)
        # a lock holds its connection for as long as it is held: no pool to run dry
        self._engine = sa.create_engine(psycopg_url(url), poolclass=sa.pool.NullPool,
                                        isolation_level="AUTOCOMMIT", connect_args=PG_CONNECT)

    def _key(self, name: str) -> str:
        return f"cdm-serve store {self.store_key} {name}"

    @contextlib.contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        """The database away while taking or checking a lock: StoreUnavailableError
        (503), nothing was changed under it."""
        import sqlalchemy as sa

        try:
            yield
        except sa.exc.DBAPIError as err:
            if not unavailable(err.orig, err.connection_invalidated):
                raise
            raise StoreUnavailableError(f"the store's {what}: database {self.where} "
                                        f"unavailable: {reason(err.orig)}") from err

    def _sql(self, conn, sql: str, **params):
        import sqlalchemy as sa

        return conn.execute(sa.text(sql), params)

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        held = self._held.__dict__
        key = self._key(name)
        if key in held:  # reentrant within the thread
            conn, depth = held[key]
            held[key] = (conn, depth + 1)
            try:
                yield
            finally:
                held[key] = (conn, held[key][1] - 1)
            return
        with self._unavailable(f"{name} lock"):
            conn = self._engine.connect()
        try:
            with self._unavailable(f"{name} lock"):
                self._sql(conn, "SELECT pg_advisory_lock(hashtextextended(:k, 0))", k=key)
            held[key] = (conn, 1)
            try:
                yield
            finally:
                del held[key]
                try:
                    self._sql(conn, "SELECT pg_advisory_unlock(hashtextextended(:k, 0))", k=key)
                except Exception as err:  # noqa: BLE001 - the connection's end releases it
                    log.warning("releasing the store's %s lock: %s", name, err)
        finally:
            conn.close()

    def check(self) -> None:
        """Before a change made under this thread's locks: each is still held (its
        connection alive). A lock whose connection dropped was released by the server
        and may be another host's now: StoreUnavailableError, and nothing is written."""
        for key, (conn, _) in list(self._held.__dict__.items()):
            if not key.startswith(self._key("")):
                continue
            with self._unavailable(f"lock ({key.rsplit(' ', 1)[1]}) check"):
                self._sql(conn, "SELECT 1")

    def committed(self, generation: int) -> None:
        """Tell every listening host that the manifest is now at `generation`."""
        with self._engine.connect() as conn:
            self._sql(conn, "SELECT pg_notify(:channel, :payload)", channel=CHANNEL,
                      payload=f"{self.store_key} {generation}")


def store_locks(root: Path, store_key: str) -> FileLocks | AdvisoryLocks:
    """The locks of the store at `root`: advisory locks when CDM_DATABASE_URL is
    PostgreSQL, else files. `store_key` tells stores in one database apart."""
    url = postgres_url()
    return AdvisoryLocks(url, store_key) if url else FileLocks(root)
