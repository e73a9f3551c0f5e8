"""Group commit of the ledger: the durable writes of many requests in one transaction.

Each generate request wrote its ledger row and its release as transactions of their
own, each a synced SQLite commit, so a flood of small requests spent the disk on
fsyncs. Here one writer thread takes every write queued while the previous commit ran
(or within `window_s` of the first), commits them together, and only then answers:
`record` returns once its row is on disk (a request answered with 200 still survives
a kill -9 right after), `release_later` does not wait. Writes commit in the order they
were queued, so a request's release, queued before its record, is durable when the
record returns.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from .db import Database


@dataclass
class _Write:
    kind: str  # "record" or "release"
    args: tuple
    done: threading.Event | None = None
    result: object = None
    error: BaseException | None = None


class Ledger:
    """The writer of one database's ledger rows (`record`) and releases."""

    def __init__(self, db: Database, window_s: float = 0.002, most: int = 256):
        self.db, self.window_s, self.most = db, window_s, most
        self.commits = 0  # transactions committed (the rows they held: self.rows)
        self.rows = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="cdm-ledger", daemon=True)
        self._thread.start()

    def record(self, user: str, params: dict, contributors: list[str],
               attribution: dict[str, list[float]]) -> str:
        """The request's ledger row and credit, durable when this returns; its id."""
        write = _Write("record", (user, params, contributors, attribution), threading.Event())
        self._queue.put(write)
        write.done.wait()
        if write.error is not None:
            raise write.error
        return write.result

    def release_later(self, worker: str, seq: int) -> None:
        """Request `seq` of `worker` is no longer in flight: committed with the next
        group, without waiting."""
        self._queue.put(_Write("release", (worker, seq)))

    def close(self) -> None:
        """Commit what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = self._gather(group)
            try:
                with self.db.transaction() as tx:
                    for write in group:
                        if write.kind == "record":
                            write.result = self.db.record_request(*write.args, db=tx)
                        else:
                            self.db.release(*write.args, db=tx)
                self.commits += 1
                self.rows += len(group)
            except BaseException as err:  # noqa: BLE001 - reported to every waiter
                for write in group:
                    write.error = err
            for write in group:
                if write.done is not None:
                    write.done.set()
            if stop:
                return

    def _gather(self, group: list) -> bool:
        """Add what is queued within the window to `group`; True if asked to stop."""
        deadline = time.monotonic() + self.window_s
        while len(group) < self.most:
            try:
                write = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if write is None:
                return True
            group.append(write)
        return False
