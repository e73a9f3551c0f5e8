"""The forget workflow of the service: an exclusion acknowledged at once, a purge as a
background job, and recovery from a crash at any step.

Step by step (crash points in brackets; `CDM_CRASH_AT`, shards/faults.py):
  1. exclusion in the manifest (the registry)                   [forget:excluded]
  2. job row `purge` and audit `exclude`, one transaction; the request is
     acknowledged                                               [forget:acknowledged]
  3. plan (the purge's audit record) on the job row             [purge:planned]
  4. wait until no request from before the exclusion is in flight (every worker)
  5. the store's purge (shards/forgetting.py): what other parts derived from the data
     (valuation caches, pruned bases, recorded valuations)     [purge:caches-dropped];
     shard, router part, kept data and staging folders         [purge:files-deleted];
     router `joint`: the classifier retrained; the exclusion record dropped from the
     manifest, with the new classifier named in the same write [classifier:switched],
     then the old version deleted                              [purge:committed]
  6. keys that act for the contributor revoked; audit `purge` and the job's end, one
     transaction (jobs.py)
Steps 1 and 2 run under the store's write lock, so a job runner never sees an
exclusion without its job. Recovery after a crash at any point finishes the work and
writes the missing records.
"""

from __future__ import annotations

import logging
import threading
import time

from shards import ShardStore
from shards.errors import StoreError, short
from shards.faults import crashpoint
from shards.settings import PURGE_DRAIN_SECONDS, REQUEST_SECONDS, WORKER_TIMEOUT_SECONDS

from .auth import Principal
from .db import Database
from .errors import ForbiddenError, Postponed
from .generation import LiveSampler
from .metrics import ServiceMetrics

log = logging.getLogger("cdm")


class Forgetting:
    """Forget requests and purge jobs of one store (`closed`: set when the worker shuts
    down; `wake`: set to wake the job runner)."""

    def __init__(self, store: ShardStore, db: Database, live: LiveSampler,
                 metrics: ServiceMetrics, device: str | None, wake: threading.Event,
                 closed: threading.Event):
        """`wake`: set to wake the purge runner; `closed`: set when the worker stops."""
        self.store, self.db, self.live, self.metrics = store, db, live, metrics
        self.device, self.wake, self.closed = device, wake, closed

    def forget(self, principal: Principal, contributor_id: str) -> dict:
        """Exclude now (durable and seen by every worker before returning), purge in
        the background. An admin may forget anyone; a contributor key only its own
        contributor (audited as a self-request). Returns the purge job and the
        exclusion's audit record.

        A forget of a contributor being forgotten answers with its purge job
        (`in_progress`), as the first did.

        Raises:
            ForbiddenError: a user key, or a contributor key for someone else (403).
            UnknownContributorError: not live nor being forgotten (404).
        """
        if not principal.may_act_for(contributor_id):
            raise ForbiddenError(f"key of {principal.user!r} may not forget {short(contributor_id)!r}")
        self_request = principal.role == "contributor"
        with self.store.write_lock():  # steps 1-2: no runner sees one without the other
            if contributor_id in self.store.manifest["excluded"]:  # asked again: in progress
                return self._in_progress(contributor_id)
            entry = self.store.exclude(contributor_id, {"actor": principal.user,
                                                        "self_request": self_request})
            crashpoint("forget:excluded")
            with self.db.transaction() as tx:
                job_id = self.db.create_job("purge", principal.user, {
                    "contributor_id": contributor_id, "self_request": self_request}, tx)
                record = self.db.audit(principal.user, "exclude", contributor_id,
                                       self._exclude_details(job_id, entry, self_request), tx)
        crashpoint("forget:acknowledged")
        self.metrics.forgets.inc()
        self.wake.set()
        # the record rides on the acknowledgement: a contributor's key is revoked when the
        # purge ends, possibly before it could ask for its audit log
        return {"job_id": job_id, "contributor_id": contributor_id, "excluded": True,
                "audit": record}

    def purge_job(self, contributor_id: str) -> str:
        """The id of the purge job of an excluded contributor: the queued or running one,
        or a new one when a crash came between the exclusion and its job (as the one
        who asked, recorded with the exclusion). Held: the store's write lock."""
        for job in self.db.jobs(("queued", "running"), kind="purge"):
            if job["params"].get("contributor_id") == contributor_id:
                return job["job_id"]
        asked = self.store.manifest["excluded"][contributor_id].get("requested_by") or {}
        return self.db.create_job("purge", asked.get("actor", "system"), {
            "contributor_id": contributor_id, "self_request": bool(asked.get("self_request"))})

    def _in_progress(self, contributor_id: str) -> dict:
        """The answer to a forget of a contributor already excluded: its purge job."""
        job_id = self.purge_job(contributor_id)
        self.wake.set()
        records = [r for r in self.db.audit_log(contributor_id, newest_first=True)
                   if r["action"] == "exclude"]
        return {"job_id": job_id, "contributor_id": contributor_id, "excluded": True,
                "in_progress": True, "audit": records[0] if records else None}

    def _exclude_details(self, job_id: str, entry: dict, self_request: bool, **extra) -> dict:
        return {"job_id": job_id, "data_hash": entry["data_hash"],
                "weights_hash": entry["weights_hash"], "self_request": self_request,
                "generation": self.store.generation, **extra}

    def purge(self, job: dict) -> dict:
        """Steps 3-6 of a purge job; resumes from whatever a crash left. Returns the
        audit record."""
        cid, job_id = job["params"]["contributor_id"], job["job_id"]
        self_request = bool(job["params"].get("self_request"))
        self.store.refresh()
        excluded = self.store.manifest["excluded"].get(cid)
        if excluded is not None:
            if not self.db.has_audit("exclude", job_id):  # crashed between steps 1 and 2
                self.db.audit(job["actor"], "exclude", cid, self._exclude_details(
                    job_id, excluded, self_request, recovered=True))
            plan = job.get("plan") or self.store.purge_plan(cid)
            self.db.set_job_plan(job_id, plan)
            crashpoint("purge:planned")
            self._drain(excluded.get("generation"))
            audit = {**plan, **self.store.purge(cid, device=self.device)}
            crashpoint("purge:committed")
        elif job.get("plan"):  # the purge finished; the crash came before its record
            audit = {"valuation_caches_dropped": None, **job["plan"], "recovered": True}
        elif cid in self.store.manifest["contributors"]:
            raise StoreError(f"{cid!r} was never excluded; send the forget request again")
        else:
            raise StoreError(f"contributor {cid!r} is neither live nor being forgotten")
        audit.update(job_id=job_id, self_request=self_request)
        revoked = self.db.revoke_contributor_keys(cid)
        if revoked:
            audit["contributor_keys_revoked"] = revoked
        self.live.sync()
        return audit

    def _drain(self, generation: int | None) -> None:
        """Wait until no live worker holds a request that started before the exclusion
        committed at `generation` (at most PURGE_DRAIN_SECONDS). A worker is live while
        its heartbeat is fresh (WORKER_TIMEOUT_SECONDS); the rows of a dead one are
        deleted, whatever host or pid namespace it ran in."""
        if generation is None:
            return
        deadline = time.monotonic() + PURGE_DRAIN_SECONDS
        while time.monotonic() < deadline and not self.closed.is_set():
            dead = set(self.db.dead_workers(time.time() - WORKER_TIMEOUT_SECONDS))
            if dead:
                self.db.drop_workers(sorted(dead))
            rows = self.db.inflight_since(generation - 1, time.time() - REQUEST_SECONDS)
            if not [r for r in rows if r["worker"] not in dead]:
                return
            time.sleep(0.05)
        if self.closed.is_set():  # shutting down: the next start resumes this purge
            raise Postponed("shutting down while requests from before the exclusion run")
        log.warning("purge: requests from before the exclusion still in flight after %.0f s",
                    PURGE_DRAIN_SECONDS)
