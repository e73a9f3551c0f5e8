"""The service's logic without HTTP: licensed generation, crash-safe forgetting,
contributor admission, attribution, credit and valuation jobs. `app.py` only adapts
it to BentoML; `cdm forget` and `cdm jobs` call it directly.

Several workers (processes) and replicas may serve one store. Each checks the
store's generation before every request (`ShardStore.refresh`, one stat) and
reloads its sampler when the live set changed, so an exclusion acknowledged by any
worker holds for every request that starts after the acknowledgement, in every
worker. Requests in flight are registered in the shared SQLite file with the store
generation they started at; a purge waits (up to PURGE_DRAIN_SECONDS) until no
worker holds a request that started before the exclusion, then deletes the files.

Admin jobs (purge, add, value) are rows in the jobs table. Every worker runs a job
runner; a runner executes jobs only while holding the store's admin lock, so each
job runs once, in one process, and a job found `running` by the lock's holder was
orphaned by a crash: purges resume from their recorded plan and write any missing
audit record, adds remove their partial files, valuations are marked failed.

Forgetting, step by step (crash points in brackets; `CDM_CRASH_AT`):
  1. job row `purge`, queued                         [forget:job-created]
  2. exclusion in the manifest (the registry)        [forget:excluded]
  3. audit `exclude`; the request is acknowledged    [forget:acknowledged]
  4. plan (the purge's audit record) on the job row  [purge:planned]
  5. valuation caches, pruned bases and valuations dropped  [purge:caches-dropped]
  6. shard, head, data and staging folders deleted   [purge:files-deleted]
  7. exclusion record dropped from the manifest      [purge:committed]
  8. audit `purge` and job `succeeded`, one transaction
Recovery after a crash at any point finishes the work and writes the records.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from PIL import Image

from shards import ShardStore, load_contributor
from shards.data import to_uint8
from shards.errors import CDMError, StoreError, UnknownContributorError, crashpoint, short
from shards.routing import Routing
from shards.sampler import ComposedSampler, SampleOutput, SampleRequest
from valuation.monolith import drop_pruned_bases
from valuation.result import ValuationResult
from valuation.run import ValuationSettings, primary, run_valuation
from valuation.utility import store_cache

from .auth import ForbiddenError, KeyVerifier, Principal, RateLimitError
from .db import Database
from .metrics import ServiceMetrics
from .paths import allowed_roots, resolve_data_folder
from .scheduler import StepScheduler

log = logging.getLogger("cdm")
PURGE_DRAIN_SECONDS = 600.0
# Pay by exact Shapley values of precision (fidelity) unless an admin sets a policy:
# on the planted-noise benchmark over the default (class-conditional) store it ranks
# planted contributors lowest with mean AUROC 0.917 and 0.908 (two sampling seeds)
# and keeps the honest contributors' order (Spearman 0.730, 0.869); Beta(16, 1)
# Shapley keeps the order better but detects less there (0.883, 0.867). On
# unconditional stores Beta(16, 1) is the better policy (README, "Planted-noise
# benchmark").
DEFAULT_PAYOUT = {"property": "precision", "method": "exact", "params": None}
BETA_DEFAULTS = {"alpha": ValuationSettings.alpha, "beta": ValuationSettings.beta}
# what `value` computes when no methods are named: credit's `shapley` and the default
# payout policy (exact), and Beta(16, 1) Shapley, the better policy on unconditional
# stores (the same coalitions, so it costs nothing more)
DEFAULT_VALUE_METHODS = ("exact", "beta-shapley")
PURGE_RETRY_SECONDS = 600.0  # a failed purge is retried (as a new job) after this long
REQUEST_SECONDS = 600.0  # BentoML's traffic timeout: no request runs longer


def _env_int(name: str, default: int | None, low: int = 1, none: bool = False) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if none and raw.lower() == "none":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low:
        raise ValueError(f"{name}={raw!r}; allowed: an integer >= {low}" + (", or 'none'" * none))
    return value


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request and per-key budgets, in images x steps. From the environment:
    CDM_MAX_REQUEST_COST (default 64 x 500: the largest request the API accepts),
    CDM_KEY_COST_PER_MINUTE (default 100000; 'none' for no limit), CDM_MAX_BATCH_ROWS
    (images sampled in one batch, default 64), CDM_MAX_BATCH (requests per batch;
    1 turns batching off)."""

    request_cost: int = 64 * 500
    key_cost_per_minute: int | None = 100_000
    batch_rows: int = 64
    batch_requests: int = 64

    @classmethod
    def from_env(cls) -> Limits:
        return cls(_env_int("CDM_MAX_REQUEST_COST", cls.request_cost),
                   _env_int("CDM_KEY_COST_PER_MINUTE", cls.key_cost_per_minute, none=True),
                   _env_int("CDM_MAX_BATCH_ROWS", cls.batch_rows),
                   _env_int("CDM_MAX_BATCH", cls.batch_requests))


class Postponed(Exception):
    """A job stops without finishing; it stays `running` and the next start resumes it."""


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
    """Record every method's values of a valuation run; the most exact Shapley values
    become their property's latest credit (`credit`'s `shapley`), the others are
    there for a payout policy to name. Returns the primary result, if any."""
    best = primary(results)
    for result in results.values():
        db.record_valuation(result.property, result.method, result.as_dict()["values"],
                            "primary" if result is best else "other", method_params(result))
    return best


def method_params(result: ValuationResult) -> dict | None:
    """The parameters a valuation's values depend on besides its method's name."""
    if result.method == "beta-shapley":
        return {"alpha": float(result.extra["alpha"]), "beta": float(result.extra["beta"])}
    return None


def payout_policy(db: Database) -> dict:
    """The policy an admin set last, else the default (`set_by` 'default')."""
    return db.payout_policy() or {**DEFAULT_PAYOUT, "set_at": None, "set_by": "default"}


def describe_policy(policy: dict) -> str:
    """'beta-shapley (alpha 16, beta 1) values of precision'."""
    params = policy.get("params")
    args = f" ({', '.join(f'{k} {v:g}' for k, v in params.items())})" if params else ""
    return f"{policy['method']}{args} values of {policy['property']}"


def payout_shares(values: dict[str, float], live: set[str]) -> dict[str, float]:
    """Each live contributor's share of a payout by `values`: negative values count as
    zero (a contributor who lowers the property is paid nothing, not charged), then
    shares are normalised to sum to 1 over the live contributors; all zero when no
    live contributor has a positive value."""
    floored = {c: max(0.0, float(values.get(c, 0.0))) for c in sorted(live)}
    total = sum(floored.values())
    return {c: (v / total if total > 0 else 0.0) for c, v in floored.items()}


@dataclasses.dataclass
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
    started: float = dataclasses.field(default_factory=time.perf_counter)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Platform:
    """One store, its SQLite state, this worker's sampler, step scheduler and job runner.

    `serve=False` (the CLI) loads no sampler and starts no threads: call
    `run_jobs()` to execute queued and orphaned jobs in the calling thread."""

    def __init__(self, store_path: str | Path, device: str | None = None, serve: bool = True,
                 limits: Limits | None = None):
        self.store = ShardStore.open(store_path)
        self.device = device
        self.db = Database(self.store.root / "service.db")
        self.verify = KeyVerifier(self.db)
        self.metrics = ServiceMetrics()
        self.limits = limits or Limits.from_env()
        self.data_roots = allowed_roots(self.store.root)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._lock = threading.RLock()
        self._seq = 0
        self._sampler: ComposedSampler | None = None
        self._sampler_key: tuple | None = None
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._scheduler = self._runner = None
        self._swept = False
        if serve:
            self._sync()
            self.metrics.watch_shard_cache(lambda: self._sampler.bank.stats() if self._sampler else {})
            self._scheduler = StepScheduler(self._open_batch, lambda job: job.request,
                                            self._batch_key, max_rows=self.limits.batch_rows,
                                            max_jobs=self.limits.batch_requests,
                                            on_done=self._observe,
                                            on_leave=lambda job: self.release(job.seq))
            self._runner = threading.Thread(target=self._job_loop, name="cdm-jobs", daemon=True)
            self._wake.set()  # recover what a crash interrupted, now
            self._runner.start()

    def close(self) -> None:
        """Stop the sampling thread and the job runner (a running job finishes first,
        up to 10 s; anything later is recovered by the next start)."""
        self._closed.set()
        self._wake.set()
        if self._scheduler is not None:
            self._scheduler.close()
        if self._runner is not None:
            self._runner.join(timeout=10)

    # ------------------------------------------------------------ the registry
    def _sync(self) -> tuple[ComposedSampler | None, set[str]]:
        """Pick up other processes' changes to the store; reload the sampler when
        any live contributor's weights or head, or the classifier, changed (a forget
        then a re-add of the same id included). Returns the sampler and the live set,
        from one manifest."""
        with self._lock:
            self.store.refresh()
            m = self.store.manifest
            live = dict(m["contributors"])
            key = (tuple((c, e["weights_hash"], (e.get("head") or {}).get("weights_hash"))
                         for c, e in sorted(live.items())),
                   (m.get("classifier") or {}).get("weights_hash"))
            if key != self._sampler_key:
                self._sampler = None  # drop the old weights before loading the new
                self._sampler = self.store.load_sampler(self.device) if live else None
                self._sampler_key = key
            return self._sampler, set(live)

    # ------------------------------------------------------------ generation
    def generate(self, principal: Principal, contributors: list[str] | None = None, n: int = 4,
                 steps: int = 50, seed: int = 0, mode: str = "composed",
                 scheduler: str = "ddpm", routing: str | None = None, top_k: int | None = None,
                 mass: float | None = None, label: int | list[int] | None = None) -> dict:
        """Sample with exactly the requested contributors (default: every live one the
        key is licensed for), record the request in the ledger, return PNGs (base64)
        and per-sample attribution keyed by contributor id. In a labelled store
        `label` (one for all images, or one per image) conditions the samples; without
        it each image's label is drawn from the composition's labels. A list of labels
        gives one per image and repeats to fill n (one label: every image).

        Raises:
            ValueError: bad arguments, or n x steps above the per-request limit (400).
            UnknownContributorError: a named contributor is not live (404).
            LabelUnavailableError: no contributor of S holds a requested label (404).
            ForbiddenError: a named contributor is not licensed (403), or none is.
            RateLimitError: the key's spend over the last minute (429).
            UnavailableError: no live contributor at all (503).
        """
        job = self.prepare_generation(principal, contributors, n, steps, seed, mode, scheduler,
                                      routing, top_k, mass, label)
        if self._scheduler is not None:  # it releases the job when the job leaves it
            out = self._scheduler.submit(job).result()
        else:
            try:
                [out] = self.sample_many([job])
            finally:
                self.release(job.seq)
            if isinstance(out, Exception):
                raise out
        return self.finish_generation(job, out)

    def submit(self, job: GenerationJob):
        """The Future of a prepared job's output, from this worker's step scheduler,
        which releases the job (`release`) when it leaves, whatever the outcome."""
        try:
            return self._scheduler.submit(job)
        except BaseException:
            self.release(job.seq)
            raise

    def prepare_generation(self, principal: Principal, contributors: list[str] | None = None,
                           n: int = 4, steps: int = 50, seed: int = 0, mode: str = "composed",
                           scheduler: str = "ddpm", routing: str | None = None, top_k: int | None = None,
                           mass: float | None = None, label: int | list[int] | None = None) -> GenerationJob:
        """Check the request, charge the key, register the request as in flight, then
        snapshot the registry (after registering: a purge that did not see this request
        in flight ran after the snapshot, whose live set already excludes the forgotten).
        The job counts as in flight until `release(job.seq)`."""
        route = Routing.parse(routing, top_k, mass, mode)
        labels = None if label is None else tuple([label] if isinstance(label, int) else label)
        cost = n * steps
        if cost > self.limits.request_cost:
            raise ValueError(f"n x steps = {cost} exceeds this server's per-request limit "
                             f"{self.limits.request_cost} (CDM_MAX_REQUEST_COST)")
        with self._lock:
            self._seq += 1
            seq = self._seq
        wait = self.db.admit(principal.key_id or principal.user, cost,
                             self.limits.key_cost_per_minute, self.worker, seq, self.store.generation)
        if wait is not None:
            raise RateLimitError(f"key of {principal.user!r} spent its {self.limits.key_cost_per_minute} "
                                 "images x steps per minute (CDM_KEY_COST_PER_MINUTE)", wait)
        try:
            sampler, live = self._sync()
            return self._check_generation(principal, contributors, n, steps, seed, mode,
                                          scheduler, route, sampler, live, seq, labels)
        except BaseException:
            self.release(seq)
            raise

    def release(self, seq: int) -> None:
        """The request `seq` no longer holds its sampler snapshot (idempotent)."""
        self.db.release(self.worker, seq)

    def _check_generation(self, principal, contributors, n, steps, seed, mode, scheduler,
                          route, sampler, live, seq, labels=None) -> GenerationJob:
        if sampler is None:
            raise UnavailableError("the store has no live contributors")
        if contributors is None:
            allowed = sorted(live if principal.license is None else live & principal.license)
            if not allowed:
                raise ForbiddenError(f"key of {principal.user!r} is licensed for no live contributor")
        else:
            if len(set(contributors)) != len(contributors):
                raise ValueError("contributors lists an id twice")
            unknown = sorted(set(contributors) - live)
            if unknown:
                raise UnknownContributorError(unknown)
            principal.check_license(contributors)
            allowed = sorted(contributors)
        if route.top_k is not None and route.top_k > len(allowed):  # "at most k": all of S
            route = dataclasses.replace(route, top_k=len(allowed))
        route.check_subset(len(allowed))
        request = SampleRequest(tuple(allowed), n, seed, labels)
        sampler.check_labels(request)  # a label no contributor of S holds: 404 before sampling
        params = {"n": n, "steps": steps, "seed": seed, "mode": mode, "scheduler": scheduler,
                  **route.to_dict()}
        if labels is not None:
            params["label"] = list(labels)
        return GenerationJob(principal, sampler, request, params, route, seq)

    @staticmethod
    def _batch_key(job: GenerationJob) -> tuple:
        p = job.params
        return (id(job.sampler), p["steps"], p["scheduler"], p["mode"], job.routing)

    @staticmethod
    def _open_batch(job: GenerationJob):
        p = job.params
        return job.sampler.batch(p["steps"], p["scheduler"], p["mode"], job.routing)

    def _observe(self, job: GenerationJob, together: int) -> None:
        job.seconds = time.perf_counter() - job.started
        self.metrics.batch_size.observe(together)

    def sample_many(self, jobs: list[GenerationJob]) -> list[SampleOutput | Exception]:
        """Sample prepared jobs in this thread, batching those that share a sampler
        snapshot, steps, scheduler and mode (a job's images do not depend on its batch)."""
        self.metrics.batch_size.observe(len(jobs))
        outputs: list[SampleOutput | Exception | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(self._batch_key(job), []).append(i)
        for idx in groups.values():
            start = time.perf_counter()
            try:
                outs = jobs[idx[0]].sampler.sample_batch(
                    [jobs[i].request for i in idx], jobs[idx[0]].params["steps"],
                    jobs[idx[0]].params["scheduler"], jobs[idx[0]].params["mode"],
                    routing=jobs[idx[0]].routing)
            except Exception as err:  # reported to each request of the group
                outs = [err] * len(idx)
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
            "labels": None if out.labels is None else out.labels.tolist(),
        }

    # ------------------------------------------------------------ forgetting
    def forget(self, principal: Principal, contributor_id: str) -> dict:
        """Exclude now (durable and seen by every worker before returning), purge in
        the background. An admin may forget anyone; a contributor key only its own
        contributor (audited as a self-request). Returns the purge job and the
        exclusion's audit record.

        Raises:
            ForbiddenError: a user key, or a contributor key for someone else (403).
            UnknownContributorError: not live (404).
        """
        if not principal.may_act_for(contributor_id):
            raise ForbiddenError(f"key of {principal.user!r} may not forget {short(contributor_id)!r}")
        self_request = principal.role == "contributor"
        # under the write lock, so a job runner never sees the exclusion without its job
        with self.store.write_lock():
            entry = self.store.exclude(contributor_id)
            crashpoint("forget:excluded")
            with self.db._tx() as tx:  # the job and its audit record, together
                job_id = self.db.create_job("purge", principal.user, {
                    "contributor_id": contributor_id, "self_request": self_request}, tx)
                record = self.db.audit(principal.user, "exclude", contributor_id,
                                       self._exclude_details(job_id, entry, self_request), tx)
        crashpoint("forget:acknowledged")
        self.metrics.forgets.inc()
        self._wake.set()
        # the record rides on the acknowledgement: a contributor's key is revoked when the
        # purge ends, possibly before it could ask for its audit log
        return {"job_id": job_id, "contributor_id": contributor_id, "excluded": True,
                "audit": record}

    def _exclude_details(self, job_id: str, entry: dict, self_request: bool, **extra) -> dict:
        return {"job_id": job_id, "data_hash": entry["data_hash"],
                "weights_hash": entry["weights_hash"], "self_request": self_request,
                "generation": self.store.generation, **extra}

    def _purge(self, job: dict) -> dict:
        """Steps 4-8 of forgetting; resumes from whatever a crash left."""
        cid, job_id = job["params"]["contributor_id"], job["job_id"]
        self_request = bool(job["params"].get("self_request"))
        self.store.refresh()
        excluded = self.store.manifest["excluded"].get(cid)
        if excluded is not None:
            if not self.db.has_audit("exclude", job_id):  # crashed between steps 2 and 3
                self.db.audit(job["actor"], "exclude", cid, self._exclude_details(
                    job_id, excluded, self_request, recovered=True))
            plan = job.get("plan") or self.store.purge_plan(cid)
            self.db.set_job_plan(job_id, plan)
            crashpoint("purge:planned")
            self._drain(excluded.get("generation"))
            plan["valuation_caches_dropped"] = self._drop_valuation_caches(cid)
            crashpoint("purge:caches-dropped")
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
        self._sync()
        return audit

    def _drain(self, generation: int | None) -> None:
        """Wait until no worker holds a request that started before the exclusion
        committed at `generation` (at most PURGE_DRAIN_SECONDS)."""
        if generation is None:
            return
        host = socket.gethostname()
        deadline = time.monotonic() + PURGE_DRAIN_SECONDS
        while time.monotonic() < deadline and not self._closed.is_set():
            rows = self.db.inflight_since(generation - 1, time.time() - REQUEST_SECONDS)
            dead = {r["worker"] for r in rows if r["worker"].split(":")[0] == host
                    and not _pid_alive(int(r["worker"].split(":")[1]))}
            if dead:
                self.db.drop_inflight(sorted(dead))
            if not [r for r in rows if r["worker"] not in dead]:
                return
            time.sleep(0.05)
        if self._closed.is_set():  # shutting down: the next start resumes this purge
            raise Postponed("shutting down while requests from before the exclusion run")
        log.warning("purge: requests from before the exclusion still in flight after %.0f s",
                    PURGE_DRAIN_SECONDS)

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
        settings = ValuationSettings(**{"methods": DEFAULT_VALUE_METHODS, **settings})
        if settings.property == "aesthetic":
            raise ValueError("property 'aesthetic' needs local model paths: use `cdm value`")
        if heldout is not None:
            heldout = str(self._data_folder(heldout))
        self.store.refresh()
        if not self.store.contributor_ids:
            raise UnavailableError("no live contributor to value")
        job_id = self.db.create_job("value", principal.user, {
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
            "heldout": heldout, "property": settings.property, "methods": list(settings.methods)})
        self._wake.set()
        return {"job_id": job_id, "property": settings.property, "methods": list(settings.methods)}

    def _value(self, job: dict) -> dict:
        raw = dict(job["params"]["settings"])
        raw["methods"] = tuple(raw["methods"])
        settings = ValuationSettings(**raw)
        players = set(self.store.contributor_ids)
        report, results = run_valuation(self.store.root, settings,
                                        heldout=job["params"].get("heldout"), progress=False)
        self.store.refresh()
        gone = sorted(players - set(self.store.contributor_ids))
        if gone:  # recording would keep values of a forgotten contributor
            raise StoreError(f"contributor(s) {', '.join(gone)} were forgotten during the "
                             "valuation; nothing was recorded; run it again")
        record_primary(self.db, results)
        self.db.audit(job["actor"], "value", "*", {"property": settings.property,
                                                    "methods": list(settings.methods),
                                                    "job_id": job["job_id"]})
        return {"property": settings.property, "players": report["players"],
                "methods": {m: {k: r[k] for k in ("values", "stderr", "u_full", "u_empty",
                                                  "efficiency_gap", "seconds")}
                            for m, r in report["methods"].items()},
                "correlations": report["correlations"]}

    # ------------------------------------------------------------- admission
    def add_contributor(self, principal: Principal, folder: str, kind: str | None = None) -> dict:
        """Admin: validate the folder now (errors are immediate), train in the
        background. `folder` must lie under one of the data roots (CDM_DATA_ROOTS)."""
        principal.require_admin()
        path = self._data_folder(folder)
        data = load_contributor(path)
        self.store.refresh()
        if data.contributor_id in self.store.contributor_ids:
            raise ValueError(f"contributor {data.contributor_id!r} is already live")
        job_id = self.db.create_job("add", principal.user,
                                    {"folder": str(path), "contributor_id": data.contributor_id,
                                     "data_hash": data.data_hash, "kind": kind})
        self._wake.set()
        return {"job_id": job_id, "contributor_id": data.contributor_id}

    def _data_folder(self, folder: str) -> Path:
        """A folder a request names, under the data roots. A folder outside them, or
        missing, is one 404 (a request cannot tell which of the two it was)."""
        try:
            return resolve_data_folder(folder, self.data_roots)
        except ValueError as err:
            raise NotFoundError(str(err)) from None

    def _add(self, job: dict) -> dict:
        params = job["params"]
        data = load_contributor(params["folder"])
        if data.data_hash != params["data_hash"]:
            raise StoreError("the folder changed since the request was accepted; send it again")
        entry = self.store.add(data, kind=params.get("kind"), device=self.device, progress=False)
        crashpoint("add:committed")
        self._sync()
        return self._add_record(job, entry)

    def _add_record(self, job: dict, entry: dict, **extra) -> dict:
        self.db.audit(job["actor"], "add", entry["contributor_id"] if "contributor_id" in entry
                      else job["params"]["contributor_id"],
                      {"data_hash": entry["data_hash"], "weights_hash": entry["weights_hash"],
                       "job_id": job["job_id"], **extra})
        return {"contributor_id": job["params"]["contributor_id"], "final_loss": entry["final_loss"]}

    # ------------------------------------------------------------------ jobs
    def _job_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self.run_jobs()
            except Exception:  # keep the runner alive; the job row says what failed
                log.exception("job runner")

    def run_jobs(self) -> int:
        """Run orphaned and queued jobs, one at a time, under the store's admin lock
        (one runner across every process). Returns how many ran."""
        if not self._swept:  # once per process: folders of adds a crash interrupted
            self.store.cleanup_orphans()
            self._swept = True
        changed = self.store.refresh()
        if changed and self._scheduler is not None:
            self._sync()  # an idle worker drops a forgotten contributor's weights too
        if not self.db.jobs(("queued", "running")) and not changed \
                and not self.store.pending_purges:
            return 0
        ran = 0
        with self.store.admin_lock():
            for job in self.db.jobs(("running",)):  # the lock holder runs nothing else: orphans
                self._run_job(job, recovering=True)
                ran += 1
            with self.store.write_lock():  # forget writes exclusion + job under it
                recent = time.time() - PURGE_RETRY_SECONDS
                covered = {j["params"].get("contributor_id") for j in self.db.jobs()
                           if j["kind"] == "purge" and (j["status"] in ("queued", "running") or (
                               j["status"] == "failed" and (j["finished_at"] or 0) > recent))}
                for cid in sorted(set(self.store.pending_purges) - covered):  # crash: no job
                    self.db.create_job("purge", "system", {"contributor_id": cid})
            for job in self.db.jobs(("queued",)):
                if self._closed.is_set():
                    break
                if self.db.claim_job(job["job_id"]):
                    self._run_job(job, recovering=False)
                    ran += 1
        return ran

    def _run_job(self, job: dict, recovering: bool) -> None:
        handlers = {"purge": self._purge, "add": self._add, "value": self._value}
        try:
            if recovering and job["kind"] == "value":
                raise StoreError("interrupted by a restart")
            if recovering and job["kind"] == "add":
                result = self._recover_add(job)
            else:
                result = handlers[job["kind"]](job)
        except Postponed as why:
            log.warning("job %s (%s) postponed: %s", job["job_id"], job["kind"], why)
            return
        except Exception as err:  # a failed job is reported through `job`, not raised
            log.warning("job %s (%s) failed: %s", job["job_id"], job["kind"], err)
            self.db.update_job(job["job_id"], "failed", error=f"{type(err).__name__}: {err}")
            return
        if job["kind"] == "purge":
            with self.db._tx() as tx:  # the record and the job's end in one transaction
                if not self.db.has_audit("purge", job["job_id"]):
                    self.db.audit(job["actor"], "purge", job["params"]["contributor_id"], result, tx)
                self.db.update_job(job["job_id"], "succeeded", result=result, db=tx)
        else:
            self.db.update_job(job["job_id"], "succeeded", result=result)

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

    def job(self, principal: Principal, job_id: str) -> dict:
        """A job, to an admin, or to the contributor key whose forgetting it is."""
        job = self.db.get_job(job_id)
        if job is None or not (principal.is_admin or (
                job["kind"] == "purge"
                and principal.may_act_for(job["params"].get("contributor_id", "")))):
            raise NotFoundError(f"no job {short(job_id)!r}")
        job.pop("plan", None)
        return job

    # --------------------------------------------------------------- reading
    def contributors(self) -> list[dict]:
        self.store.refresh()
        entries = dict(self.store.manifest["contributors"])  # one snapshot: no 404 mid-list
        return [{"contributor_id": c, "images": e["images"], "kind": e["kind"],
                 "added_at": e["added_at"],
                 "labels": dict(sorted(e.get("labels", {}).items(), key=lambda kv: int(kv[0])))}
                for c, e in sorted(entries.items())]

    def attribution(self, principal: Principal, request_id: str) -> dict:
        row = self.db.get_request(request_id)
        if row is None or not (row["user"] == principal.user or principal.is_admin):
            raise NotFoundError(f"no request {short(request_id)!r}")  # the same for others' ids
        return {"request_id": request_id, "user": row["user"], "created_at": row["created_at"],
                "params": json.loads(row["params"]), "contributors": json.loads(row["contributors"]),
                "attribution": json.loads(row["attribution"])}

    def credit(self, principal: Principal) -> dict:
        """Per contributor: `usage` (samples generated with it allowed, attribution
        mass, share of all mass), `payout_share` under the admin's payout policy (once
        set and its valuation recorded), and the latest Shapley values per property.

        An admin sees every contributor, forgotten ones included (they were used
        before they left; they get no payout share); a contributor key its own row;
        a user key its own usage of the live contributors, without payouts."""
        self.store.refresh()
        live = set(self.store.contributor_ids)
        if principal.role == "user":
            totals = {c: t for c, t in self.db.credit_totals(principal.user).items() if c in live}
        else:
            totals = self.db.credit_totals()
        mass = sum(t["mass"] for t in totals.values()) or 1.0
        rows = {c: {"usage": {**t, "share": t["mass"] / mass}, "live": c in live}
                for c, t in totals.items()}
        if principal.role != "user":
            for c in live - set(rows):
                rows[c] = {"usage": {"samples": 0, "mass": 0.0, "share": 0.0}, "live": True}
            payout = self._payout(live)
            for c, row in rows.items():
                row["payout_share"] = payout["shares"].get(c) if payout["shares"] else None
        valuations = self.db.latest_valuations()
        for prop, val in valuations.items():
            for c, phi in val["values"].items():
                if c in rows:
                    rows[c].setdefault("shapley", {})[prop] = phi
        out = {}
        if principal.role == "contributor":
            rows = {c: r for c, r in rows.items() if c == principal.contributor_id}
            valuations = {p: {**v, "values": {c: x for c, x in v["values"].items()
                                              if c == principal.contributor_id}}
                          for p, v in valuations.items()}
            out["payout_policy"] = {k: v for k, v in payout.items() if k != "shares"}
        elif principal.role == "user":
            valuations = {}
        else:
            out["payout_policy"] = {k: v for k, v in payout.items() if k != "shares"}
        return {"contributors": dict(sorted(rows.items())), "valuations": valuations, **out}

    def _payout(self, live: set[str]) -> dict:
        """The policy, the valuation it pays by, and the live contributors' shares (None
        with a `note` when there is no policy or its valuation is not recorded)."""
        policy = payout_policy(self.db)
        valuation = self.db.valuation(policy["property"], policy["method"], policy.get("params"))
        if valuation is None or not live <= set(valuation["values"]):
            return {"policy": policy, "shares": None,
                    "note": f"no recorded valuation gives {describe_policy(policy)} for every "
                            "live contributor (none yet, or a forget or an add since): run "
                            "value again"}
        return {"policy": policy, "valuation_at": valuation["at"],
                "shares": payout_shares(valuation["values"], live),
                "note": "negative values count as zero; shares sum to 1 over live contributors"}

    def set_payout_policy(self, principal: Principal, property: str, method: str,
                          alpha: float | None = None, beta: float | None = None) -> dict:
        """Admin: pay by the latest recorded `method` values of `property` (for
        beta-shapley, those computed with Beta(`alpha`, `beta`), default 16 and 1).

        Raises:
            ValueError: alpha or beta for a method other than beta-shapley, or not > 0.
            StoreError: no such valuation was ever recorded (409), naming those that were.
        """
        principal.require_admin()
        params = None
        if method == "beta-shapley":
            params = {"alpha": float(BETA_DEFAULTS["alpha"] if alpha is None else alpha),
                      "beta": float(BETA_DEFAULTS["beta"] if beta is None else beta)}
            if not (params["alpha"] > 0 and params["beta"] > 0):
                raise ValueError(f"alpha={params['alpha']:g}, beta={params['beta']:g}; "
                                 "allowed: both > 0")
        elif alpha is not None or beta is not None:
            raise ValueError(f"alpha and beta apply to method 'beta-shapley' only, not {method!r}")
        policy = {"property": property, "method": method, "params": params}
        if self.db.valuation(property, method, params) is None:
            recorded = ", ".join(describe_policy({"property": p, "method": m, "params": a})
                                 for p, m, a in self.db.recorded_valuations()) or "none"
            raise StoreError(f"no recorded valuation gives {describe_policy(policy)}; run value "
                             f"with it first; recorded: {recorded}")
        self.db.set_payout_policy(principal.user, property, method, params)
        self.db.audit(principal.user, "payout_policy", "*", policy)
        self.store.refresh()
        return self._payout(set(self.store.contributor_ids))

    def history(self, principal: Principal, limit: int = 100, before: float | None = None) -> dict:
        """Newest first: an admin's view of every request, a user's own requests, or
        the requests that used a contributor key's contributor (its samples and
        attribution mass; not who sent them)."""
        if principal.role == "contributor":
            rows = self.db.history(contributor_id=principal.contributor_id, limit=limit, before=before)
        else:
            rows = self.db.history(user=None if principal.is_admin else principal.user,
                                   limit=limit, before=before)
        return {"requests": rows}
