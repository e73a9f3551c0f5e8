"""The service's logic without HTTP: licensed generation, two-stage forgetting,
contributor admission, attribution, credit and valuation jobs. `app.py` only adapts it to BentoML.

Consistency: the live sampler and live set are swapped under a lock. A request takes
a snapshot at its start, so a forget acknowledged before a request starts is never
used by it, and a forget during a request does not disturb it: shards load lazily,
so the purge first waits (up to PURGE_DRAIN_SECONDS) for the requests that started
before the exclusion to finish, then deletes the files. Admin jobs (purge, add) run
one at a time in a background thread; the job table is durable, and a purge
interrupted by a crash is resumed at the next start from the store's own record of
pending purges.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from shards import ShardStore, load_contributor
from shards.data import to_uint8
from shards.errors import CDMError, UnknownContributorError
from shards.routing import Routing
from shards.sampler import ComposedSampler, SampleOutput, SampleRequest
from valuation.monolith import drop_pruned_bases
from valuation.result import ValuationResult
from valuation.run import ValuationSettings, primary, run_valuation
from valuation.utility import store_cache

from .auth import ForbiddenError, KeyVerifier, Principal
from .db import Database
from .metrics import ServiceMetrics

PURGE_DRAIN_SECONDS = 600.0


class NotFoundError(CDMError):
    """A request, job or contributor that does not exist (HTTP 404)."""


class UnavailableError(CDMError):
    """The store has no live contributor to generate with (HTTP 503)."""


def png_base64(image_hwc) -> str:
    buf = io.BytesIO()
    mode = "L" if image_hwc.shape[-1] == 1 else "RGB"
    Image.fromarray(image_hwc[..., 0] if mode == "L" else image_hwc, mode=mode).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def record_primary(db: Database, results: dict) -> ValuationResult | None:
    """Record a valuation run's most exact Shapley values as their property's latest
    credit (what `credit` shows). Returns the recorded result, if any."""
    best = primary(results)
    if best is not None:
        db.record_valuation(best.property, best.method, best.as_dict()["values"])
    return best


@dataclass
class GenerationJob:
    """A generate request that passed its checks, bound to the sampler snapshot
    taken when it started."""

    principal: Principal
    sampler: ComposedSampler
    request: SampleRequest
    params: dict
    routing: Routing
    seq: int = 0
    seconds: float = 0.0


class Platform:
    """One store, its SQLite state, the live sampler and a background job worker."""

    def __init__(self, store_path: str | Path, device: str | None = None):
        self.store = ShardStore.open(store_path)
        self.device = device
        self.db = Database(self.store.root / "service.db")
        self.verify = KeyVerifier(self.db)
        self.metrics = ServiceMetrics()
        self._lock = threading.RLock()
        self._drained = threading.Condition(self._lock)
        self._inflight: set[int] = set()  # seq of each prepared, not yet sampled request
        self._seq = 0
        self._sampler = self._load_sampler()
        self.metrics.watch_shard_cache(lambda: self._sampler.bank.stats() if self._sampler else {})
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdm-job")
        self._resume_after_crash()

    def _load_sampler(self):
        return self.store.load_sampler(self.device) if self.store.contributor_ids else None

    def _reload(self) -> None:
        sampler = self._load_sampler()
        with self._lock:
            self._sampler = sampler

    def close(self, wait: bool = True) -> None:
        self._jobs.shutdown(wait=wait)

    # ------------------------------------------------------------ generation
    def generate(self, principal: Principal, contributors: list[str] | None = None, n: int = 4,
                 steps: int = 50, seed: int = 0, mode: str = "composed",
                 scheduler: str = "ddpm", routing: str | None = None, top_k: int | None = None,
                 mass: float | None = None) -> dict:
        """Sample with exactly the requested contributors (default: every live one the
        key is licensed for), record the request in the ledger, return PNGs (base64)
        and per-sample attribution keyed by contributor id.

        Raises:
            UnknownContributorError: a named contributor is not live (404).
            ForbiddenError: a named contributor is not licensed (403), or none is.
            UnavailableError: no live contributor at all (503).
        """
        job = self.prepare_generation(principal, contributors, n, steps, seed, mode, scheduler,
                                      routing, top_k, mass)
        [out] = self.sample_many([job])
        if isinstance(out, Exception):
            raise out
        return self.finish_generation(job, out)

    def prepare_generation(self, principal: Principal, contributors: list[str] | None, n: int,
                           steps: int, seed: int, mode: str, scheduler: str,
                           routing: str | None = None, top_k: int | None = None,
                           mass: float | None = None) -> GenerationJob:
        """Check licence, liveness and routing against a snapshot of the live sampler
        (routing None: the default, dense for mode naive). The returned job counts as
        in flight until `sample_many` has sampled it."""
        route = Routing.parse(routing, top_k, mass, mode)
        with self._lock:  # snapshot and in-flight registration in one critical section
            sampler, live = self._sampler, set(self.store.contributor_ids)
            self._seq += 1
            seq = self._seq
            self._inflight.add(seq)
        try:
            return self._check_generation(principal, contributors, n, steps, seed, mode,
                                          scheduler, route, sampler, live, seq)
        except BaseException:
            self.release(seq)
            raise

    def release(self, seq: int) -> None:
        """The request `seq` no longer holds its sampler snapshot (idempotent)."""
        with self._drained:
            self._inflight.discard(seq)
            self._drained.notify_all()

    def _check_generation(self, principal, contributors, n, steps, seed, mode, scheduler,
                          route, sampler, live, seq) -> GenerationJob:
        if sampler is None:
            raise UnavailableError("the store has no live contributors")
        if contributors is None:
            allowed = sorted(live if principal.license is None else live & principal.license)
            if not allowed:
                raise ForbiddenError(f"key of {principal.user!r} is licensed for no live contributor")
        else:
            if len(set(contributors)) != len(contributors):
                raise ValueError(f"contributors lists an id twice: {contributors}")
            unknown = sorted(set(contributors) - live)
            if unknown:
                raise UnknownContributorError(unknown)
            principal.check_license(contributors)
            allowed = sorted(contributors)
        route.check_subset(len(allowed))
        return GenerationJob(principal, sampler, SampleRequest(tuple(allowed), n, seed),
                             {"n": n, "steps": steps, "seed": seed, "mode": mode,
                              "scheduler": scheduler, **route.to_dict()}, route, seq)

    def sample_many(self, jobs: list[GenerationJob]) -> list[SampleOutput | Exception]:
        """Sample several prepared jobs, batching those that share a sampler snapshot,
        steps, scheduler and mode (a job's images do not depend on its batch)."""
        self.metrics.batch_size.observe(len(jobs))
        outputs: list[SampleOutput | Exception | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            p = job.params
            key = (id(job.sampler), p["steps"], p["scheduler"], p["mode"], job.routing)
            groups.setdefault(key, []).append(i)
        for (_, steps, scheduler, mode, routing), idx in groups.items():
            start = time.perf_counter()
            try:
                outs = jobs[idx[0]].sampler.sample_batch([jobs[i].request for i in idx], steps,
                                                         scheduler, mode, routing=routing)
            except Exception as err:  # reported to each request of the group
                outs = [err] * len(idx)
            finally:
                for i in idx:
                    self.release(jobs[i].seq)
            seconds = time.perf_counter() - start
            for i, out in zip(idx, outs, strict=True):
                jobs[i].seconds = seconds
                outputs[i] = out
        return outputs

    def finish_generation(self, job: GenerationJob, out: SampleOutput) -> dict:
        """Ledger row (durable before returning), metrics, and the response body."""
        attribution = {c: out.attribution_mean[:, i].tolist() for i, c in enumerate(out.contributor_ids)}
        request_id = self.db.record_request(job.principal.user, job.params, out.contributor_ids,
                                            attribution)
        self.metrics.record_generation(out.contributor_ids, attribution, job.seconds)
        return {
            "request_id": request_id,
            "contributors": out.contributor_ids,
            "images": [png_base64(img) for img in to_uint8(out.images * 2 - 1)],
            "attribution": attribution,
            "attribution_last": {c: out.attribution_last[:, i].tolist()
                                 for i, c in enumerate(out.contributor_ids)},
        }

    # ------------------------------------------------------------ forgetting
    def forget(self, principal: Principal, contributor_id: str) -> dict:
        """Exclude now (before returning), purge in the background. Returns the job."""
        principal.require_admin()
        with self._lock:
            entry = self.store.exclude(contributor_id)
            self.db.audit(principal.user, "exclude", contributor_id,
                          {"data_hash": entry["data_hash"], "weights_hash": entry["weights_hash"]})
            job_id = self.db.create_job("purge", principal.user, {"contributor_id": contributor_id})
            barrier = self._seq  # requests up to this one may have started with the contributor
        self.metrics.forgets.inc()
        self._jobs.submit(self._run_job, job_id, self._purge, principal.user, contributor_id, barrier)
        return {"job_id": job_id, "contributor_id": contributor_id, "excluded": True}

    def _purge(self, actor: str, contributor_id: str, barrier: int | None = None) -> dict:
        with self._drained:  # let requests that started before the exclusion finish
            self._drained.wait_for(lambda: not any(s <= (barrier or 0) for s in self._inflight),
                                   timeout=PURGE_DRAIN_SECONDS)
        audit = self.store.purge(contributor_id, device=self.device)
        self._reload()
        audit["valuation_caches_dropped"] = self._drop_valuation_caches(contributor_id)
        self.db.audit(actor, "purge", contributor_id, audit)
        return audit

    def _drop_valuation_caches(self, contributor_id: str) -> int:
        """Delete every cached utility and pruned base whose numbers `contributor_id`'s
        data shaped, and the recorded valuations that value it (their player set no
        longer exists). Returns how many were deleted."""
        dropped = store_cache(self.store).drop(contributor_id)
        dropped += drop_pruned_bases(self.store.root, contributor_id)
        return dropped + self.db.drop_valuations(contributor_id)

    # ------------------------------------------------------------- valuation
    def value(self, principal: Principal, heldout: str | None = None, **settings) -> dict:
        """Admin: start a valuation job of the live contributors; `settings` are
        `ValuationSettings` fields (property, methods, n, steps, seed, ...), checked
        now. Its most exact Shapley values become the property's latest credit."""
        principal.require_admin()
        unknown = sorted(set(settings) - set(ValuationSettings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown valuation settings {unknown}")
        settings = ValuationSettings(**{"methods": ("exact",), **settings})
        if settings.property == "aesthetic":
            raise ValueError("property 'aesthetic' needs local model paths: use `cdm value`")
        if not self.store.contributor_ids:
            raise UnavailableError("no live contributor to value")
        job_id = self.db.create_job("value", principal.user, {"property": settings.property,
                                                              "methods": list(settings.methods)})
        self._jobs.submit(self._run_job, job_id, self._value, principal.user, settings, heldout)
        return {"job_id": job_id, "property": settings.property, "methods": list(settings.methods)}

    def _value(self, actor: str, settings: ValuationSettings, heldout: str | None) -> dict:
        report, results = run_valuation(self.store.root, settings, heldout=heldout,
                                        progress=False)
        record_primary(self.db, results)
        self.db.audit(actor, "value", "*", {"property": settings.property,
                                             "methods": list(settings.methods)})
        return {"property": settings.property, "players": report["players"],
                "methods": {m: {k: r[k] for k in ("values", "stderr", "u_full", "u_empty",
                                                  "efficiency_gap", "seconds")}
                            for m, r in report["methods"].items()},
                "correlations": report["correlations"]}

    # ------------------------------------------------------------- admission
    def add_contributor(self, principal: Principal, folder: str, kind: str | None = None) -> dict:
        """Validate the folder now (errors are immediate), train in the background."""
        principal.require_admin()
        data = load_contributor(folder)
        if data.contributor_id in self.store.contributor_ids:
            raise ValueError(f"contributor {data.contributor_id!r} is already live")
        job_id = self.db.create_job("add", principal.user,
                                    {"folder": str(folder), "contributor_id": data.contributor_id})
        self._jobs.submit(self._run_job, job_id, self._add, principal.user, data, kind)
        return {"job_id": job_id, "contributor_id": data.contributor_id}

    def _add(self, actor: str, data, kind: str | None) -> dict:
        entry = self.store.add(data, kind=kind, device=self.device, progress=False)
        self._reload()
        self.db.audit(actor, "add", data.contributor_id,
                      {"data_hash": entry["data_hash"], "weights_hash": entry["weights_hash"]})
        return {"contributor_id": data.contributor_id, "final_loss": entry["final_loss"]}

    # ------------------------------------------------------------------ jobs
    def _run_job(self, job_id: str, fn, *args) -> None:
        self.db.update_job(job_id, "running")
        try:
            result = fn(*args)
        except Exception as err:  # a failed job is reported through `job`, not raised
            self.db.update_job(job_id, "failed", error=f"{type(err).__name__}: {err}")
        else:
            self.db.update_job(job_id, "succeeded", result=result)

    def job(self, principal: Principal, job_id: str) -> dict:
        principal.require_admin()
        job = self.db.get_job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r}")
        return job

    def _resume_after_crash(self) -> None:
        """Jobs that were queued or running when the process died: purges resume
        (the store still lists them as pending), additions are marked failed. An
        exclusion whose job row was never written gets a new purge job."""
        pending, covered = set(self.store.pending_purges), set()
        for job in self.db.interrupted_jobs():
            cid = job["params"].get("contributor_id")
            if job["kind"] == "purge" and cid in pending and cid not in covered:
                covered.add(cid)
                self._jobs.submit(self._run_job, job["job_id"], self._purge, job["actor"], cid)
            else:
                self.db.update_job(job["job_id"], "failed", error="interrupted by a restart")
        for cid in sorted(pending - covered):
            job_id = self.db.create_job("purge", "system", {"contributor_id": cid})
            self._jobs.submit(self._run_job, job_id, self._purge, "system", cid)

    # --------------------------------------------------------------- reading
    def contributors(self) -> list[dict]:
        return [{"contributor_id": c, "images": e["images"], "kind": e["kind"],
                 "added_at": e["added_at"]}
                for c, e in ((c, self.store.contributor(c)) for c in self.store.contributor_ids)]

    def attribution(self, principal: Principal, request_id: str) -> dict:
        row = self.db.get_request(request_id)
        if row is None:
            raise NotFoundError(f"no request {request_id!r}")
        if row["user"] != principal.user and not principal.is_admin:
            raise ForbiddenError(f"request {request_id!r} belongs to another user")
        return {"request_id": request_id, "user": row["user"], "created_at": row["created_at"],
                "params": json.loads(row["params"]), "contributors": json.loads(row["contributors"]),
                "attribution": json.loads(row["attribution"])}

    def credit(self) -> dict:
        """Per contributor: samples generated with it allowed, attribution mass, share
        of all mass, and the latest Shapley values per property (once valued)."""
        totals = self.db.credit_totals()
        mass = sum(t["mass"] for t in totals.values()) or 1.0
        live = set(self.store.contributor_ids)
        rows = {c: {**t, "share": t["mass"] / mass, "live": c in live} for c, t in totals.items()}
        for c in live - set(rows):
            rows[c] = {"samples": 0, "mass": 0.0, "share": 0.0, "live": True}
        valuations = self.db.latest_valuations()
        for prop, val in valuations.items():
            for c, phi in val["values"].items():
                if c in rows:
                    rows[c].setdefault("shapley", {})[prop] = phi
        return {"contributors": dict(sorted(rows.items())), "valuations": valuations}
