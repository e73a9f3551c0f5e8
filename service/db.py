"""The service's records: API keys (hashed), the credit ledger, the forgetting audit
log, background jobs, per-key spend, valuations and payout policies, and the
requests in flight in every worker, in one database (service/sql.py: the SQLite file
in the store's folder, or PostgreSQL shared by many hosts). Every worker, replica
and host of one store opens the same database.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from sqlalchemy.engine import Connection, RowMapping

from .admission import AdmissionRecords
from .sql import DB_FILE, SQL, database_url

__all__ = ["DB_FILE", "Database", "database_url", "open_database"]


def _params(params: dict | None) -> str | None:
    """Canonical JSON of a method's parameters (floats), None for none."""
    return json.dumps({k: float(v) for k, v in sorted(params.items())}) if params else None


def _unparams(text: str | None) -> dict | None:
    """The parameters `_params` stored (None for none)."""
    return json.loads(text) if text else None


def open_database(store_root) -> Database:
    """The database of the store at `store_root` (CDM_DATABASE_URL, else its SQLite file)."""
    return Database(database_url(store_root))


class Database(SQL, AdmissionRecords):
    """The records, over one SQLite file or one Postgres database (admission's in
    service/admission.py)."""

    # ------------------------------------------------------------------ keys
    def secret(self, name: str) -> bytes:
        """A random 32-byte secret of this database, made at its first use."""
        with self.transaction() as db:
            self.write("INSERT INTO secrets (name, value) VALUES (:name, :value) "
                       "ON CONFLICT (name) DO NOTHING", db, {"name": name, "value": os.urandom(32)})
            return bytes(self.row("SELECT value FROM secrets WHERE name = :name", db,
                                  name=name)["value"])

    def insert_key(self, key_id: str, user: str, role: str, license: list[str] | None,
                   salt: bytes, key_hash: bytes, expires_at: float | None = None,
                   contributor_id: str | None = None, scheme: str | None = "hmac") -> None:
        with self.transaction() as db:
            self.write('INSERT INTO keys (key_id, "user", role, license, salt, key_hash, '
                       "created_at, expires_at, contributor_id, scheme) VALUES (:key_id, :user, "
                       ":role, :license, :salt, :key_hash, :now, :expires_at, :contributor_id, "
                       ":scheme)", db,
                       {"key_id": key_id, "user": user, "role": role,
                        "license": json.dumps(license), "salt": salt, "key_hash": key_hash,
                        "now": time.time(), "expires_at": expires_at,
                        "contributor_id": contributor_id, "scheme": scheme})

    def rehash_key(self, key_id: str, key_hash: bytes, scheme: str = "hmac") -> None:
        """Store a key's hash under another scheme (a legacy scrypt hash, upgraded)."""
        with self.transaction() as db:
            self.write("UPDATE keys SET key_hash = :key_hash, salt = :salt, scheme = :scheme "
                       "WHERE key_id = :key_id", db,
                       {"key_hash": key_hash, "salt": b"", "scheme": scheme, "key_id": key_id})

    def get_key(self, key_id: str) -> RowMapping | None:
        return self.row("SELECT * FROM keys WHERE key_id = :key_id", key_id=key_id)

    def list_keys(self) -> list[dict]:
        rows = self.rows('SELECT key_id, "user", role, license, contributor_id, created_at, '
                         "expires_at, revoked_at FROM keys ORDER BY created_at")
        return [{**dict(r), "license": json.loads(r["license"])} for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked (kept for the audit trail). Returns whether it existed
        and was not already revoked."""
        with self.transaction() as db:
            return self.write("UPDATE keys SET revoked_at = :now WHERE key_id = :key_id AND "
                              "revoked_at IS NULL", db, {"now": time.time(), "key_id": key_id}) == 1

    def revoke_contributor_keys(self, contributor_id: str) -> int:
        """Revoke the keys that act for `contributor_id` (it was forgotten: a later
        contributor with the same id is someone else). Returns how many."""
        with self.transaction() as db:
            return self.write("UPDATE keys SET revoked_at = :now WHERE contributor_id = :cid "
                              "AND revoked_at IS NULL", db,
                              {"now": time.time(), "cid": contributor_id})

    # ---------------------------------------------------------------- ledger
    def record_request(self, user: str, params: dict, contributors: list[str],
                       attribution: dict[str, list[float]], db: Connection | None = None) -> str:
        """One row per generate request, and its per-contributor credit, in one
        transaction (or in `db`'s). Returns the request id."""
        if db is None:
            with self.transaction() as db:
                return self.record_request(user, params, contributors, attribution, db)
        request_id = uuid.uuid4().hex
        self.write('INSERT INTO requests (request_id, "user", created_at, params, contributors, '
                   "attribution) VALUES (:id, :user, :now, :params, :contributors, :attribution)",
                   db, {"id": request_id, "user": user, "now": time.time(),
                        "params": json.dumps(params), "contributors": json.dumps(contributors),
                        "attribution": json.dumps(attribution)})
        self.write("INSERT INTO credit (request_id, contributor_id, samples, mass) "
                   "VALUES (:id, :cid, :samples, :mass)", db,
                   [{"id": request_id, "cid": c, "samples": params["n"],
                     "mass": float(sum(attribution[c]))} for c in contributors])
        return request_id

    def get_request(self, request_id: str) -> RowMapping | None:
        return self.row("SELECT * FROM requests WHERE request_id = :id", id=request_id)

    def credit_totals(self, user: str | None = None) -> dict[str, dict[str, float]]:
        """Samples and attribution mass per contributor, over every request or over
        `user`'s requests only."""
        sql = ("SELECT c.contributor_id, SUM(c.samples) AS samples, SUM(c.mass) AS mass "
               "FROM credit c")
        if user is not None:
            sql += ' JOIN requests r ON r.request_id = c.request_id WHERE r."user" = :user'
        rows = self.rows(sql + " GROUP BY c.contributor_id", user=user)
        return {r["contributor_id"]: {"samples": int(r["samples"]), "mass": float(r["mass"])}
                for r in rows}

    def history(self, user: str | None = None, contributor_id: str | None = None,
                limit: int = 100, before: float | None = None) -> list[dict]:
        """Newest first: a user's requests (with their contributors), or the requests
        that used a contributor (with its samples and mass, without the user)."""
        before = time.time() + 1 if before is None else before
        if contributor_id is not None:
            return [dict(r) for r in self.rows(
                "SELECT r.request_id, r.created_at, c.samples, c.mass FROM credit c "
                "JOIN requests r ON r.request_id = c.request_id "
                "WHERE c.contributor_id = :cid AND r.created_at < :before "
                "ORDER BY r.created_at DESC LIMIT :limit",
                cid=contributor_id, before=before, limit=limit)]
        sql = "SELECT * FROM requests WHERE created_at < :before"
        if user is not None:
            sql += ' AND "user" = :user'
        rows = self.rows(sql + " ORDER BY created_at DESC LIMIT :limit",
                         before=before, user=user, limit=limit)
        return [{"request_id": r["request_id"], "user": r["user"], "created_at": r["created_at"],
                 "params": json.loads(r["params"]), "contributors": json.loads(r["contributors"])}
                for r in rows]

    # ----------------------------------------------------------------- audit
    def audit(self, actor: str, action: str, contributor_id: str, details: dict,
              db: Connection | None = None) -> dict:
        """Append an audit record; returns it as `audit_log` would."""
        if db is None:
            with self.transaction() as db:
                return self.audit(actor, action, contributor_id, details, db)
        at = time.time()
        row = self.row("INSERT INTO audit (at, actor, action, contributor_id, details) "
                       "VALUES (:at, :actor, :action, :cid, :details) RETURNING id", db,
                       at=at, actor=actor, action=action, cid=contributor_id,
                       details=json.dumps(details))
        return {"id": row["id"], "at": at, "actor": actor, "action": action,
                "contributor_id": contributor_id, "details": details}

    def audit_log(self, contributor_id: str | None = None, limit: int | None = None,
                  newest_first: bool = False) -> list[dict]:
        """Audit records in order (or newest first), of one contributor or all, at most
        `limit`."""
        sql = "SELECT * FROM audit" + (" WHERE contributor_id = :cid" if contributor_id else "")
        sql += " ORDER BY id" + (" DESC" if newest_first else "")
        if limit is not None:
            sql += " LIMIT :limit"
        return [{**dict(r), "details": json.loads(r["details"])}
                for r in self.rows(sql, cid=contributor_id, limit=limit)]

    def forgotten(self, contributor_id: str) -> dict | None:
        """The latest exclusion record of `contributor_id` (a forget was acknowledged
        for that id), or None if it was never forgotten."""
        row = self.row("SELECT at, actor FROM audit WHERE action = 'exclude' AND "
                       "contributor_id = :cid ORDER BY id DESC LIMIT 1", cid=contributor_id)
        return None if row is None else dict(row)

    def has_audit(self, action: str, job_id: str, db: Connection | None = None) -> bool:
        """Whether the job `job_id` already wrote its `action` record (in `db`'s
        transaction: then holding the job's lock, so that two runners that both
        finished it write one record)."""
        if db is not None:
            self.lock(db, f"job {job_id}")
        rows = self.rows("SELECT details FROM audit WHERE action = :action AND details LIKE :like",
                         db, action=action, like=f"%{job_id}%")
        return any(json.loads(r["details"]).get("job_id") == job_id for r in rows)

    # ------------------------------------------------------------------ jobs
    def create_job(self, kind: str, actor: str, params: dict,
                   db: Connection | None = None) -> str:
        if db is None:
            with self.transaction() as db:
                return self.create_job(kind, actor, params, db)
        job_id = uuid.uuid4().hex
        self.write("INSERT INTO jobs (job_id, kind, actor, params, status, created_at) "
                   "VALUES (:id, :kind, :actor, :params, 'queued', :now)", db,
                   {"id": job_id, "kind": kind, "actor": actor, "params": json.dumps(params),
                    "now": time.time()})
        return job_id

    def update_job(self, job_id: str, status: str, result: dict | None = None,
                   error: str | None = None, db: Connection | None = None) -> None:
        if db is None:
            with self.transaction() as db:
                return self.update_job(job_id, status, result, error, db)
        finished = time.time() if status in ("succeeded", "failed") else None
        self.write("UPDATE jobs SET status = :status, result = :result, error = :error, "
                   "finished_at = :finished WHERE job_id = :id", db,
                   {"status": status, "result": json.dumps(result) if result is not None else None,
                    "error": error, "finished": finished, "id": job_id})

    def set_job_plan(self, job_id: str, plan: dict) -> None:
        """What a job is about to do, written before it does it (crash recovery)."""
        with self.transaction() as db:
            self.write("UPDATE jobs SET plan = :plan WHERE job_id = :id", db,
                       {"plan": json.dumps(plan), "id": job_id})

    def claim_job(self, job_id: str) -> bool:
        """queued -> running; False if another runner took it first."""
        with self.transaction() as db:
            return self.write("UPDATE jobs SET status = 'running' WHERE job_id = :id AND "
                              "status = 'queued'", db, {"id": job_id}) == 1

    @staticmethod
    def _job(row: RowMapping) -> dict:
        job = dict(row)
        job["params"] = json.loads(job["params"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        job["plan"] = json.loads(job["plan"]) if job.get("plan") else None
        return job

    def get_job(self, job_id: str) -> dict | None:
        row = self.row("SELECT * FROM jobs WHERE job_id = :id", id=job_id)
        return None if row is None else self._job(row)

    def jobs(self, statuses: tuple[str, ...] | None = None,
             kind: str | tuple[str, ...] | None = None, limit: int | None = None,
             newest_first: bool = False, finished_after: float | None = None) -> list[dict]:
        """Jobs in creation order (or newest first), optionally only those with the
        given statuses or kind(s), or finished after a time, at most `limit`: one query."""
        clauses, args = [], {}
        if finished_after is not None:
            clauses.append("finished_at > :after")
            args["after"] = finished_after
        kinds = None if kind is None else (kind,) if isinstance(kind, str) else tuple(kind)
        for column, values in (("status", statuses), ("kind", kinds)):
            if values:
                names = [f"{column}{i}" for i in range(len(values))]
                clauses.append(f"{column} IN ({', '.join(':' + n for n in names)})")
                args.update(zip(names, values, strict=True))
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        sql += " ORDER BY created_at" + (" DESC" if newest_first else "")
        if limit is not None:
            sql, args["limit"] = sql + " LIMIT :limit", limit
        return [self._job(r) for r in self.rows(sql, **args)]

    # ------------------------------------------------------------ valuations
    def record_valuation(self, prop: str, method: str, values: dict,
                         kind: str = "primary", params: dict | None = None) -> None:
        with self.transaction() as db:
            self.write("INSERT INTO valuations (at, property, method, values_json, kind, params) "
                       "VALUES (:at, :prop, :method, :values, :kind, :params)", db,
                       {"at": time.time(), "prop": prop, "method": method,
                        "values": json.dumps(values), "kind": kind, "params": _params(params)})

    def valuation(self, prop: str, method: str, params: dict | None = None) -> dict | None:
        """The newest recorded values of (`prop`, `method`) with exactly these
        parameters (None: a method without any), or None."""
        text = _params(params)
        row = self.row("SELECT * FROM valuations WHERE property = :prop AND method = :method "
                       "AND " + ("params IS NULL" if text is None else "params = :params") +
                       " ORDER BY id DESC LIMIT 1", prop=prop, method=method, params=text)
        return None if row is None else {"property": prop, "method": method, "params": params,
                                         "at": row["at"], "values": json.loads(row["values_json"])}

    def valuations(self, limit: int = 200) -> list[dict]:
        """The newest `limit` recorded valuations, newest first."""
        rows = self.rows("SELECT * FROM valuations ORDER BY id DESC LIMIT :limit", limit=limit)
        return [{"at": r["at"], "property": r["property"], "method": r["method"],
                 "params": _unparams(r["params"]),
                 "kind": r["kind"] or "primary", "values": json.loads(r["values_json"])}
                for r in rows]

    def recorded_valuations(self) -> list[tuple[str, str, dict | None]]:
        """Every (property, method, parameters) with recorded values."""
        rows = self.rows("SELECT DISTINCT property, method, params FROM valuations")
        found = sorted({(r["property"], r["method"], r["params"] or "") for r in rows})
        return [(prop, method, _unparams(params)) for prop, method, params in found]

    def set_payout_policy(self, actor: str, prop: str, method: str,
                          params: dict | None = None) -> None:
        with self.transaction() as db:
            self.write("INSERT INTO payout_policy (at, actor, property, method, params) "
                       "VALUES (:at, :actor, :prop, :method, :params)", db,
                       {"at": time.time(), "actor": actor, "prop": prop, "method": method,
                        "params": _params(params)})

    def payout_policy(self) -> dict | None:
        row = self.row("SELECT * FROM payout_policy ORDER BY id DESC LIMIT 1")
        return None if row is None else {
            "property": row["property"], "method": row["method"],
            "params": _unparams(row["params"]), "set_at": row["at"], "set_by": row["actor"]}

    def drop_valuations(self, contributor_id: str) -> int:
        """Delete the recorded valuations that have a value for `contributor_id`."""
        with self.transaction() as db:
            ids = [r["id"] for r in self.rows("SELECT id, values_json FROM valuations", db)
                   if contributor_id in json.loads(r["values_json"])]
            self.write("DELETE FROM valuations WHERE id = :id", db, [{"id": i} for i in ids])
        return len(ids)

    def latest_valuations(self) -> dict[str, dict]:
        """{property: {"method", "at", "values"}} from the newest row per property."""
        rows = self.rows("SELECT * FROM valuations WHERE id IN (SELECT MAX(id) FROM valuations "
                         "WHERE kind IS NULL OR kind = 'primary' GROUP BY property)")
        return {r["property"]: {"method": r["method"], "at": r["at"],
                                "values": json.loads(r["values_json"])} for r in rows}
