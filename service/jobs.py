"""Admin jobs (purge, add, value) as rows of the jobs table, and the runners that
execute them.

Jobs run in two lanes, so that forgetting never waits for a contributor's training
or a valuation: purges under the store's admin lock, adds and valuations under its
work lock (shards/registry.py). Every worker runs a runner per lane, but a runner
executes its lane's jobs only while holding the lane's lock, so each job runs once,
in one process; a job of its lane that the lock's holder finds `running` was orphaned
by a crash: purges resume from their recorded plan and write any missing audit
record, adds finish their record or remove their partial files, valuations are marked
failed. Within a lane, jobs run in the order they were created.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

from shards import ShardStore, load_contributor
from shards.errors import StoreError, StoreUnavailableError, short
from shards.faults import crashpoint
from shards.settings import PURGE_RETRY_SECONDS, RAY_ENV, SERVED_PROPERTIES, env_int, env_str
from valuation.run import ValuationSettings, run_valuation

from .auth import Principal
from .credit import record_primary
from .db import Database
from .errors import DatabaseUnavailable, NotFoundError, Postponed, UnavailableError
from .forget import Forgetting
from .generation import LiveSampler
from .paths import resolve_data_folder

log = logging.getLogger("cdm")


LANES = {"purge": ("purge",), "work": ("add", "value")}  # lane -> the job kinds it runs


class Jobs:
    """The jobs of one store: admission of add and value jobs, and the runners."""

    def __init__(self, store: ShardStore, db: Database, live: LiveSampler | None,
                 forgetting: Forgetting, data_roots: list[Path], device: str | None,
                 wakes: dict[str, threading.Event], closed: threading.Event):
        """`live`: the worker's sampler, reloaded when another process changed the
        store (None: no sampler to keep current, as in the CLI); `wakes`: an event per
        lane, set to wake its runner."""
        self.store, self.db, self.live, self.forgetting = store, db, live, forgetting
        self.data_roots, self.device, self.closed = data_roots, device, closed
        self.wakes = wakes
        self.progress = live is None  # progress bars where a person runs the jobs (CLI)
        self._swept = False
        self.handlers = {"purge": forgetting.purge, "add": self._add, "value": self._value}

    # -------------------------------------------------------------- admission
    def data_folder(self, folder: str) -> Path:
        """A folder a request names, under the data roots. A folder outside them, or
        missing, is one 404 (a request cannot tell which of the two it was)."""
        try:
            return resolve_data_folder(folder, self.data_roots)
        except ValueError as err:
            raise NotFoundError(str(err)) from None

    def add_contributor(self, principal: Principal, folder: str, kind: str | None = None,
                        anywhere: bool = False) -> dict:
        """Admin: validate the folder now (errors are immediate), train in the
        background. `folder` must lie under one of the data roots (CDM_DATA_ROOTS),
        unless `anywhere` (the shell's `cdm add`, which reads as its user)."""
        principal.require_admin()
        path = Path(folder).resolve() if anywhere else self.data_folder(folder)
        data = load_contributor(path, shape=self.store.pixel_shape)
        self.check_new_id(data.contributor_id)
        self.store.check_add(data, kind)  # captions, labels, kind: refused now, not in the job
        job_id = self.db.create_job("add", principal.user,
                                    {"folder": str(path), "contributor_id": data.contributor_id,
                                     "data_hash": data.data_hash, "kind": kind})
        self.wakes["work"].set()
        return {"job_id": job_id, "contributor_id": data.contributor_id}

    def check_new_id(self, contributor_id: str) -> None:
        """An id is admitted once: never while live, never after it was forgotten (a
        new contributor under an old id would inherit the old one's licences, credit,
        history and audit records).

        Raises:
            ValueError: the id is live (400).
            StoreError: the id belonged to a forgotten contributor (409).
        """
        self.store.refresh()
        if contributor_id in self.store.contributor_ids:
            raise ValueError(f"contributor {contributor_id!r} is already live")
        if contributor_id in self.store.pending_purges or self.db.forgotten(contributor_id):
            raise StoreError(f"contributor id {contributor_id!r} belonged to a contributor who "
                             "was forgotten; ids are not reused, so that one contributor's "
                             "licences, credit and history never cover another: rename the "
                             "folder to a new id")

    def value(self, principal: Principal, heldout: str | None = None, **settings) -> dict:
        """Admin: start a valuation job of the live contributors; `settings` are
        `ValuationSettings` fields (property, methods, n, steps, seed, ...), checked
        now. Its most exact Shapley values become the property's latest credit."""
        principal.require_admin()
        unknown = sorted(set(settings) - set(ValuationSettings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown valuation settings {unknown}")
        settings = ValuationSettings(**settings)
        if settings.property not in SERVED_PROPERTIES:
            raise ValueError(f"property {settings.property!r} needs local model paths: use "
                             "`cdm value`")
        if heldout is not None:
            heldout = str(self.data_folder(heldout))
        self.store.refresh()
        if not self.store.contributor_ids:
            raise UnavailableError("no live contributor to value")
        job_id = self.db.create_job("value", principal.user, {
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
            "heldout": heldout, "property": settings.property, "methods": list(settings.methods)})
        self.wakes["work"].set()
        return {"job_id": job_id, "property": settings.property, "methods": list(settings.methods)}

    def job(self, principal: Principal, job_id: str) -> dict:
        """A job, to an admin, or to the contributor key whose forgetting it is."""
        job = self.db.get_job(job_id)
        if job is None or not (principal.is_admin or (
                job["kind"] == "purge"
                and principal.may_act_for(job["params"].get("contributor_id", "")))):
            raise NotFoundError(f"no job {short(job_id)!r}")
        job.pop("plan", None)
        return job

    # ----------------------------------------------------------------- runners
    def loop(self, lane: str) -> None:
        """A runner thread of `lane`: runs its jobs whenever woken, and at least every
        second."""
        wake = self.wakes[lane]
        while not self.closed.is_set():
            wake.wait(timeout=1.0)
            wake.clear()
            try:
                self.run(lane)
            except Exception:  # keep the runner alive; the job row says what failed
                log.exception("job runner (%s)", lane)

    def run(self, lane: str | None = None) -> int:
        """Run the orphaned and queued jobs of `lane` (both lanes, purges first, when
        None), one at a time, under the lane's lock (one runner per lane across every
        process). Returns how many ran."""
        if lane is None:
            return self.run("purge") + self.run("work")
        if lane == "work" and not self._swept:  # once: folders of adds a crash interrupted
            self.store.cleanup_orphans()
            self._swept = True
        changed = self.store.refresh()
        # an idle worker drops a forgotten contributor's weights too: compared with the
        # generation the sampler was built at (another read may have refreshed the store)
        if self.live is not None and self.live.generation != self.store.generation:
            self.live.sync()
        kinds = LANES[lane]
        pending = lane == "purge" and self.store.pending_purges
        if not self.db.jobs(("queued", "running"), kind=kinds) and not changed and not pending:
            return 0
        ran = 0
        with self.store.admin_lock() if lane == "purge" else self.store.work_lock():
            for job in self.db.jobs(("running",), kind=kinds):  # the holder's own: orphans
                self._run(job, recovering=True)
                ran += 1
            if lane == "purge":
                self._purge_jobs_for_exclusions()
            for job in self.db.jobs(("queued",), kind=kinds):
                if self.closed.is_set():
                    break
                if self.db.claim_job(job["job_id"]):
                    self._run(job, recovering=False)
                    ran += 1
        return ran

    def _purge_jobs_for_exclusions(self) -> None:
        """A purge job for every exclusion without one (a crash came between the two),
        unless a purge of it failed recently (retried after PURGE_RETRY_SECONDS)."""
        with self.store.write_lock():  # forget writes exclusion + job under it
            recent = time.time() - PURGE_RETRY_SECONDS
            covered = {j["params"].get("contributor_id") for j in [
                *self.db.jobs(("queued", "running"), kind="purge"),
                *self.db.jobs(("failed",), kind="purge", finished_after=recent)]}
            for cid in sorted(set(self.store.pending_purges) - covered):
                self.forgetting.purge_job(cid)

    def _run(self, job: dict, recovering: bool) -> None:
        try:
            if recovering and job["kind"] == "value":
                raise StoreError("interrupted by a restart")
            if recovering and job["kind"] == "add":
                result = self._recover_add(job)
            else:
                result = self.handlers[job["kind"]](job)
        except Postponed as why:
            log.warning("job %s (%s) postponed: %s", job["job_id"], job["kind"], why)
            return
        except Exception as err:  # a failed job is reported through `job`, not raised
            if job["kind"] == "purge" and isinstance(err, StoreUnavailableError | DatabaseUnavailable):
                # the database or the volume away: the purge stays running and the next
                # pass resumes it from its plan, instead of a retry ten minutes later
                log.warning("purge job %s postponed: %s", job["job_id"], err)
                return
            log.warning("job %s (%s) failed: %s", job["job_id"], job["kind"], err)
            self.db.update_job(job["job_id"], "failed", error=f"{type(err).__name__}: {err}")
            return
        if job["kind"] == "purge":
            with self.db.transaction() as tx:  # the record and the job's end, together
                if not self.db.has_audit("purge", job["job_id"], tx):
                    self.db.audit(job["actor"], "purge", job["params"]["contributor_id"], result, tx)
                self.db.update_job(job["job_id"], "succeeded", result=result, db=tx)
        else:
            self.db.update_job(job["job_id"], "succeeded", result=result)

    # ------------------------------------------------------------ add, value
    def _add(self, job: dict) -> dict:
        params = job["params"]
        data = load_contributor(params["folder"], shape=self.store.pixel_shape)
        if data.data_hash != params["data_hash"]:
            raise StoreError("the folder changed since the request was accepted; send it again")
        entry = self.store.add(data, kind=params.get("kind"), device=self.device,
                               progress=self.progress)
        crashpoint("add:committed")
        if self.live is not None:
            self.live.sync()
        return self._add_record(job, entry)

    def _add_record(self, job: dict, entry: dict, **extra) -> dict:
        self.db.audit(job["actor"], "add", entry["contributor_id"] if "contributor_id" in entry
                      else job["params"]["contributor_id"],
                      {"data_hash": entry["data_hash"], "weights_hash": entry["weights_hash"],
                       "job_id": job["job_id"], **extra})
        return {"contributor_id": job["params"]["contributor_id"], "final_loss": entry["final_loss"]}

    def _recover_add(self, job: dict) -> dict:
        """An add that a crash interrupted: done if the manifest names it (write the
        missing record), else its partial files are deleted and the job fails."""
        cid = job["params"]["contributor_id"]
        self.store.refresh()
        if cid in self.store.manifest["contributors"]:  # the add finished before the crash
            entry = self.store.contributor(cid)
            if self.db.has_audit("add", job["job_id"]):
                return {"contributor_id": cid, "final_loss": entry["final_loss"]}
            return self._add_record(job, entry, recovered=True)
        deleted = self.store.cleanup_orphans()
        raise StoreError(f"interrupted by a restart; partial files removed: {deleted or 'none'}")

    def _value(self, job: dict) -> dict:
        raw = dict(job["params"]["settings"])
        raw["methods"] = tuple(raw["methods"])
        settings = ValuationSettings(**raw)
        if env_str(RAY_ENV):  # the operator's cluster, never a request's choice
            settings = dataclasses.replace(settings, ray_address=env_str(RAY_ENV),
                                           workers=env_int("CDM_RAY_WORKERS"))
        players = set(self.store.contributor_ids)
        report, results = run_valuation(self.store.root, settings,
                                        heldout=job["params"].get("heldout"), progress=False)
        with self.store.write_lock():  # no exclusion between this check and the record
            gone = sorted(players - set(self.store.contributor_ids))
            if gone:  # recording would keep values of a forgotten contributor
                raise StoreError(f"contributor(s) {', '.join(gone)} were forgotten during "
                                 "the valuation; nothing was recorded; run it again")
            record_primary(self.db, results)
        self.db.audit(job["actor"], "value", "*", {"property": settings.property,
                                                    "methods": list(settings.methods),
                                                    "job_id": job["job_id"]})
        return {"property": settings.property, "players": report["players"],
                "methods": {m: {k: r[k] for k in ("values", "stderr", "u_full", "u_empty",
                                                  "efficiency_gap", "seconds")}
                            for m, r in report["methods"].items()},
                "correlations": report["correlations"]}
