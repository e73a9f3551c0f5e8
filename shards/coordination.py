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
import threading
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from .settings import DATABASE_ENV, env_str

CHANNEL = "cdm_store"  # the NOTIFY channel of manifest commits
LOCK_FILES = {"write": ".lock", "admin": ".admin.lock", "work": ".work.lock"}


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

    def committed(self, generation: int) -> None:
        """Other processes stat the manifest; nothing to send."""


class AdvisoryLocks:
    """The store's locks as PostgreSQL session advisory locks (many hosts)."""

    kind = "postgres"
    _held = threading.local()  # per thread: lock key -> (connection, depth)

    def __init__(self, url: str, store_key: str):
        import sqlalchemy as sa

        self.store_key = store_key
        raw = sa.make_url(url)
        if raw.drivername in ("postgresql", "postgres"):
            raw = raw.set(drivername="postgresql+psycopg")
        # a lock holds its connection for as long as it is held: no pool to run dry
        self._engine = sa.create_engine(raw, poolclass=sa.pool.NullPool,
                                        isolation_level="AUTOCOMMIT",
                                        connect_args={"connect_timeout": 10})

    def _key(self, name: str) -> str:
        return f"cdm-serve store {self.store_key} {name}"

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        import sqlalchemy as sa

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
        conn = self._engine.connect()
        try:
            conn.execute(sa.text("SELECT pg_advisory_lock(hashtextextended(:k, 0))"), {"k": key})
            held[key] = (conn, 1)
            try:
                yield
            finally:
                del held[key]
                conn.execute(sa.text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"),
                             {"k": key})
        finally:
            conn.close()

    def committed(self, generation: int) -> None:
        """Tell every listening host that the manifest is now at `generation`."""
        import sqlalchemy as sa

        with self._engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_notify(:channel, :payload)"),
                         {"channel": CHANNEL, "payload": f"{self.store_key} {generation}"})


def store_locks(root: Path, store_key: str) -> FileLocks | AdvisoryLocks:
    """The locks of the store at `root`: advisory locks when CDM_DATABASE_URL is
    PostgreSQL, else files. `store_key` tells stores in one database apart."""
    url = postgres_url()
    return AdvisoryLocks(url, store_key) if url else FileLocks(root)
