"""The records of admission (the `Database`'s part for them): each key's spend over
the last minute, the requests in flight in every worker of every host, and the
workers' heartbeats, by which a crashed worker's requests are told from live ones."""

from __future__ import annotations

import time

from sqlalchemy.engine import Connection


class AdmissionRecords:
    """Mixed into `service.db.Database` (needs its `transaction`, `rows`, `write`, `lock`)."""

    def admit(self, key_id: str, cost: int, per_minute: int | None, worker: str, seq: int,
              generation: int, requests_per_minute: int | None = None
              ) -> tuple[float, str] | None:
        """Charge `cost` to `key_id` and register request `seq` of `worker` as in
        flight at store `generation`, in one transaction. Returns None, or (seconds to
        wait, "cost" or "requests") when the key's spend over the last minute plus
        `cost` would pass `per_minute`, or its requests would pass
        `requests_per_minute` (nothing is charged then)."""
        now = time.time()
        with self.transaction() as db:
            if per_minute is not None or requests_per_minute is not None:
                self.lock(db, f"spend {key_id}")  # two hosts never both pass one key's limit
                # refunds are rows of negative cost: they give back spend, not requests
                window = "FROM spend WHERE key_id = :key AND at > :since"
                totals = self.row("SELECT COALESCE(SUM(CASE WHEN cost > 0 THEN 1 ELSE 0 END), 0) "
                                  f"AS sent, COALESCE(SUM(cost), 0) AS spent {window}", db,
                                  key=key_id, since=now - 60)
                sent, spent = int(totals["sent"]), int(totals["spent"])
                over_requests = requests_per_minute is not None and sent + 1 > requests_per_minute
                over_cost = per_minute is not None and spent + cost > per_minute
                if over_requests or over_cost:  # when may it come back: the window's rows
                    rows = self.rows(f"SELECT at, cost {window} ORDER BY at", db,
                                     key=key_id, since=now - 60)
                if over_requests:
                    sent_at = [r["at"] for r in rows if r["cost"] > 0]
                    oldest = sent_at[len(sent_at) - requests_per_minute]
                    return max(1.0, oldest + 60 - now), "requests"
                if over_cost:
                    # the earliest moment enough of the window's spend has expired
                    need, freed = spent + cost - per_minute, 0
                    for r in rows:
                        freed += r["cost"]
                        if freed >= need:
                            return max(1.0, r["at"] + 60 - now), "cost"
                    return 60.0, "cost"
                self.write("DELETE FROM spend WHERE at <= :since", db, {"since": now - 60})
                self._spend(db, key_id, now, cost)
            self.heartbeat(worker, db)
            self.write("INSERT INTO inflight (worker, seq, generation, started_at) "
                       "VALUES (:worker, :seq, :generation, :now)", db,
                       {"worker": worker, "seq": seq, "generation": generation, "now": now})
        return None

    def _spend(self, db: Connection, key_id: str, at: float, cost: int) -> None:
        self.write("INSERT INTO spend (key_id, at, cost) VALUES (:key, :at, :cost)", db,
                   {"key": key_id, "at": at, "cost": cost})

    def refund(self, key_id: str, cost: int) -> None:
        """Give back `cost` of `key_id`'s spend in the current minute (work a client
        that left did not get)."""
        with self.transaction() as db:
            self._spend(db, key_id, time.time(), -cost)

    def spent(self, key_id: str | None = None) -> int:
        """The spend recorded in the current window, of one key or of all (refunds
        subtracted)."""
        row = self.row("SELECT COALESCE(SUM(cost), 0) AS spent FROM spend" +
                       (" WHERE key_id = :key" if key_id is not None else ""), key=key_id)
        return int(row["spent"])

    def release(self, worker: str, seq: int, db: Connection | None = None) -> None:
        """Request `seq` of `worker` is no longer in flight."""
        if db is None:
            with self.transaction() as db:
                return self.release(worker, seq, db)
        self.write("DELETE FROM inflight WHERE worker = :worker AND seq = :seq", db,
                   {"worker": worker, "seq": seq})

    def inflight_since(self, generation: int, started_after: float = 0.0) -> list[dict]:
        """Requests of any worker admitted at store generation <= `generation` and
        started after `started_after` (older rows belong to requests past any timeout)."""
        return [dict(r) for r in self.rows(
            "SELECT * FROM inflight WHERE generation <= :generation AND started_at > :after",
            generation=generation, after=started_after)]

    def heartbeat(self, worker: str, db: Connection | None = None) -> None:
        """`worker` (a random instance id) is alive now."""
        if db is None:
            with self.transaction() as db:
                return self.heartbeat(worker, db)
        now = time.time()
        self.write("INSERT INTO workers (worker, started_at, heartbeat_at) VALUES "
                   "(:worker, :now, :now) ON CONFLICT (worker) DO UPDATE SET "
                   "heartbeat_at = excluded.heartbeat_at", db, {"worker": worker, "now": now})
        # workers silent for an hour with nothing in flight (a CLI that generated, then
        # exited) leave no row behind
        self.write("DELETE FROM workers WHERE heartbeat_at < :since AND worker NOT IN "
                   "(SELECT worker FROM inflight)", db, {"since": now - 3600})

    def dead_workers(self, silent_since: float) -> list[str]:
        """Workers with requests in flight whose last heartbeat is older than
        `silent_since` (or who never beat)."""
        return [r["worker"] for r in self.rows(
            "SELECT DISTINCT i.worker FROM inflight i LEFT JOIN workers w ON w.worker = i.worker "
            "WHERE w.heartbeat_at IS NULL OR w.heartbeat_at < :since", since=silent_since)]

    def drop_workers(self, workers: list[str]) -> None:
        """Forget workers known to be dead (or stopped), and their in-flight rows."""
        with self.transaction() as db:
            for table in ("inflight", "workers"):
                self.write(f"DELETE FROM {table} WHERE worker = :worker", db,
                           [{"worker": w} for w in workers])
