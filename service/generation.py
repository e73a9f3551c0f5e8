"""Licensed generation, without HTTP: admission (cost limits, the key's spend), the
checks of a request against the live registry and the key's licence, the glue to the
step scheduler (which requests share a batch), and the ledger row and response.

A request is registered as in flight (in the database, with the store generation it
started at) before it snapshots the registry, and released when it leaves the
scheduler; a purge waits until no request from before its exclusion is in flight
(forget.py), so no request that could still load a forgotten shard outlives its files.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time

from PIL import Image

from shards import ShardStore
from shards.data import to_uint8
from shards.errors import UnknownContributorError
from shards.routing import Routing
from shards.sampler import ComposedSampler, SampleOutput, SampleRequest
from shards.settings import SAMPLE_STEPS, VARIABLES, env_int

from .auth import Principal
from .db import Database
from .errors import ForbiddenError, RateLimitError, UnavailableError
from .ledger import Ledger
from .metrics import ServiceMetrics


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request and per-key budgets, in shard evaluations (images x steps x the
    most shards an image runs on), the bound on shards per image, and the batch
    bounds; from the environment by default (shards/settings.py: CDM_MAX_REQUEST_COST,
    CDM_KEY_COST_PER_MINUTE and CDM_KEY_REQUESTS_PER_MINUTE, None for no limit,
    CDM_MAX_BATCH_ROWS, CDM_MAX_BATCH,
    CDM_MAX_SHARDS_PER_IMAGE)."""

    request_cost: int = VARIABLES["CDM_MAX_REQUEST_COST"].default
    key_cost_per_minute: int | None = VARIABLES["CDM_KEY_COST_PER_MINUTE"].default
    batch_rows: int = VARIABLES["CDM_MAX_BATCH_ROWS"].default
    batch_requests: int = VARIABLES["CDM_MAX_BATCH"].default
    shards_per_image: int = VARIABLES["CDM_MAX_SHARDS_PER_IMAGE"].default
    active_batches: int = VARIABLES["CDM_MAX_ACTIVE_BATCHES"].default
    key_requests_per_minute: int | None = VARIABLES["CDM_KEY_REQUESTS_PER_MINUTE"].default

    @classmethod
    def from_env(cls) -> Limits:
        return cls(env_int("CDM_MAX_REQUEST_COST"), env_int("CDM_KEY_COST_PER_MINUTE"),
                   env_int("CDM_MAX_BATCH_ROWS"), env_int("CDM_MAX_BATCH"),
                   env_int("CDM_MAX_SHARDS_PER_IMAGE"), env_int("CDM_MAX_ACTIVE_BATCHES"),
                   env_int("CDM_KEY_REQUESTS_PER_MINUTE"))


def png_base64(image_hwc) -> str:
    """One uint8 (H, W, C) image as a base64 PNG."""
    buf = io.BytesIO()
    mode = "L" if image_hwc.shape[-1] == 1 else "RGB"
    Image.fromarray(image_hwc[..., 0] if mode == "L" else image_hwc, mode=mode).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


class LiveSampler:
    """This worker's sampler over the store's live contributors, reloaded whenever a
    live contributor's weights or head, or the joint classifier, changed (a forget then
    a re-add of the same id included)."""

    def __init__(self, store: ShardStore, device: str | None):
        self.store, self.device = store, device
        self.sampler: ComposedSampler | None = None
        self.generation: int | None = None  # of the manifest last synced with
        self._key: tuple | None = None
        self._lock = threading.RLock()
        self.licences: dict[str, dict] = {}  # contributor -> {"licence", "attribution"}

    def sync(self) -> tuple[ComposedSampler | None, set[str]]:
        """Pick up other processes' changes to the store; returns the sampler and the
        live set, from one manifest."""
        with self._lock:
            self.store.refresh()
            self.generation = self.store.generation
            live = dict(self.store.manifest["contributors"])
            self.licences = {c: e["licence"] for c, e in live.items() if "licence" in e}
            router = self.store.router_fingerprint(live)["hashes"] if live else None
            key = (tuple((c, e["weights_hash"]) for c, e in sorted(live.items())),
                   json.dumps(router, sort_keys=True))
            if key != self._key:
                self.sampler = None  # drop the old weights before loading the new
                self.sampler = self.store.load_sampler(self.device) if live else None
                self._key = key
            return self.sampler, set(live)

    def held(self) -> list[str]:
        """Contributors whose weights this worker's sampler holds or may load (its
        router's outputs and its shard cache's contributors)."""
        sampler = self.sampler
        if sampler is None:
            return []
        return sorted(set(sampler.classifier_ids) | set(sampler.bank.contributor_ids))


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
    licences: dict = dataclasses.field(default_factory=dict)  # of the contributors in S
    cost: int = 0  # shard evaluations charged
    seconds: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def owner(self) -> str:
        """Whose service the job counts as, for fair scheduling: its key."""
        return self.principal.key_id or self.principal.user


class Generation:
    """Admits, checks and finishes generate requests of one worker (`worker`: its
    id in the in-flight table)."""

    def __init__(self, store: ShardStore, db: Database, live: LiveSampler,
                 metrics: ServiceMetrics, limits: Limits, worker: str, ledger: Ledger):
        self.store, self.db, self.live, self.metrics = store, db, live, metrics
        self.limits, self.worker, self.ledger = limits, worker, ledger
        self._seq = 0
        self._lock = threading.Lock()
        # key -> (time.time() until which it is refused, the limit's message): a client
        # that ignores Retry-After is refused again from memory, not by a database
        # transaction per request (a refusal by request count stands whatever the next
        # request costs: only time frees the window)
        self._refused: dict[str, tuple[float, str]] = {}

    def prepare(self, principal: Principal, contributors: list[str] | None = None, n: int = 4,
                steps: int = SAMPLE_STEPS, seed: int = 0, mode: str = "composed",
                scheduler: str = "ddpm", routing: str | None = None, top_k: int | None = None,
                mass: float | None = None, label: int | list[int] | None = None,
                draw_above: int | None = None, prompt: str | None = None,
                guidance: float = 1.0) -> GenerationJob:
        """Check the request, charge the key, register the request as in flight, then
        snapshot the registry (after registering: a purge that did not see this request
        in flight ran after the snapshot, whose live set already excludes the forgotten).
        The job counts as in flight until `release(job.seq)`.

        Raises:
            ValueError: bad arguments, more shards per image than the cap, or a cost
                above the per-request limit (400).
            RateLimitError: the key's spend over the last minute (429).
            and the errors of `_check`.
        """
        route = Routing.parse(routing, top_k, mass, mode, draw_above)
        labels = None if label is None else tuple([label] if isinstance(label, int) else label)
        # guidance evaluates every routed shard twice: with the prompt and without
        twice = 2 if prompt is not None and float(guidance) != 1.0 else 1
        cost = n * steps * self._shards_per_image(principal, contributors, route) * twice
        if cost > self.limits.request_cost:
            raise ValueError(f"n x steps x shards per image = {cost} exceeds this server's "
                             f"per-request limit {self.limits.request_cost} "
                             "(CDM_MAX_REQUEST_COST)")
        key = principal.key_id or principal.user
        now = time.time()
        refused = self._refused.get(key)
        if refused is not None and now < refused[0]:
            raise RateLimitError(refused[1], refused[0] - now)
        with self._lock:
            self._seq += 1
            seq = self._seq
        refusal = self.db.admit(key, cost, self.limits.key_cost_per_minute, self.worker, seq,
                                self.store.generation, self.limits.key_requests_per_minute)
        if refusal is not None:
            wait, what = refusal
            limit = (f"{self.limits.key_cost_per_minute} shard evaluations per minute "
                     "(CDM_KEY_COST_PER_MINUTE)" if what == "cost" else
                     f"{self.limits.key_requests_per_minute} requests per minute "
                     "(CDM_KEY_REQUESTS_PER_MINUTE)")
            message = f"key of {principal.user!r} spent its {limit}"
            if what == "requests":
                if len(self._refused) > 10_000:  # keys refused long ago
                    self._refused = {k: v for k, v in self._refused.items() if v[0] > now}
                self._refused[key] = (now + wait, message)
            raise RateLimitError(message, wait)
        try:
            sampler, live = self.live.sync()
            job = self._check(principal, contributors, n, steps, seed, mode, scheduler, route,
                              sampler, live, seq, labels, prompt, guidance)
        except BaseException:  # refused before any sampling: not billed (it still counts
            if self.limits.key_cost_per_minute is not None or \
                    self.limits.key_requests_per_minute is not None:  # as a request)
                self.db.refund(key, cost)
            self.release(seq)
            raise
        job.cost = cost
        return job

    def release(self, seq: int) -> None:
        """The request `seq` no longer holds its sampler snapshot (idempotent)."""
        self.db.release(self.worker, seq)

    def release_later(self, job: GenerationJob) -> None:
        """As `release`, committed with the ledger's next group (the scheduler's thread
        must not wait for the disk)."""
        self.ledger.release_later(self.worker, job.seq)

    def _shards_per_image(self, principal: Principal, contributors, route: Routing) -> int:
        """The most shards the request evaluates an image on at a step: what its cost
        multiplies (dense routing or a mass alone runs an image on every contributor of
        S, which the default top-k bounds).

        Raises:
            ValueError: more than CDM_MAX_SHARDS_PER_IMAGE (400).
        """
        if contributors is None:
            self.store.refresh()
            live = set(self.store.contributor_ids)
            size = len(live if principal.license is None else live & principal.license)
        else:
            size = len(set(contributors))
        shards = route.max_shards(max(1, size))
        if shards > self.limits.shards_per_image:
            raise ValueError(f"this request may evaluate each image on {shards} shards at a "
                             f"step; the limit is {self.limits.shards_per_image} "
                             "(CDM_MAX_SHARDS_PER_IMAGE): name fewer contributors or set "
                             "top_k")
        return shards

    def _check(self, principal, contributors, n, steps, seed, mode, scheduler, route, sampler,
               live, seq, labels=None, prompt=None, guidance=1.0) -> GenerationJob:
        """Raises:
            UnknownContributorError: a named contributor is not live (404).
            LabelUnavailableError: no contributor of S holds a requested label (404).
            TextUnavailableError: a prompt to a store without text conditioning, or a
                label to a text store (404).
            ValueError: a prompt longer than the text encoder takes, or blank (400).
            ForbiddenError: a named contributor is not licensed (403), or none is.
            UnavailableError: no live contributor at all (503).
        """
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
        request = SampleRequest(tuple(allowed), n, seed, labels, steps, prompt, guidance)
        sampler.check_labels(request)  # a label no contributor of S holds: 404 before sampling
        params = {"n": n, "steps": steps, "seed": seed, "mode": mode, "scheduler": scheduler,
                  **route.to_dict()}
        if labels is not None:
            params["label"] = list(labels)
        if prompt is not None:
            params["prompt"], params["guidance"] = prompt, guidance
        licences = {c: self.live.licences[c] for c in allowed if c in self.live.licences}
        return GenerationJob(principal, sampler, request, params, route, seq, licences)

    # ----------------------------------------------------- the step scheduler
    @staticmethod
    def batch_key(job: GenerationJob) -> tuple:
        """Jobs with the same key may share a batch (each with its own step count)."""
        p = job.params
        return (id(job.sampler), p["scheduler"], p["mode"], job.routing)

    @staticmethod
    def open_batch(job: GenerationJob):
        """An empty batch for the job's settings."""
        p = job.params
        return job.sampler.batch(p["steps"], p["scheduler"], p["mode"], job.routing)

    def refund(self, job: GenerationJob, steps_done: int) -> None:
        """A job whose client left is charged only the steps it took."""
        steps = job.params["steps"]
        unused = job.cost * (steps - steps_done) // steps
        if unused > 0:
            self.db.refund(job.principal.key_id or job.principal.user, unused)

    def observe(self, job: GenerationJob, together: int) -> None:
        """A job finished in a batch of `together` requests."""
        job.seconds = time.perf_counter() - job.started
        self.metrics.batch_size.observe(together)

    def sample_here(self, jobs: list[GenerationJob]) -> list[SampleOutput | Exception]:
        """Sample prepared jobs in this thread (no scheduler: the CLI), batching those
        that share a key (a job's images do not depend on its batch)."""
        self.metrics.batch_size.observe(len(jobs))
        outputs: list[SampleOutput | Exception | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(self.batch_key(job), []).append(i)
        for idx in groups.values():
            start = time.perf_counter()
            first = jobs[idx[0]]
            try:
                outs = first.sampler.sample_batch(
                    [jobs[i].request for i in idx], first.params["steps"],
                    first.params["scheduler"], first.params["mode"], routing=first.routing)
            except Exception as err:  # reported to each request of the group
                outs = [err] * len(idx)
            seconds = time.perf_counter() - start
            for i, out in zip(idx, outs, strict=True):
                jobs[i].seconds = seconds
                outputs[i] = out
        return outputs

    def finish(self, job: GenerationJob, out: SampleOutput) -> dict:
        """Ledger row (durable before returning), metrics, and the response body."""
        attribution = {c: out.attribution_mean[:, i].tolist() for i, c in enumerate(out.contributor_ids)}
        request_id = self.ledger.record(job.principal.user, job.params, out.contributor_ids,
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
            "prompt": job.params.get("prompt"),
            "notices": notices(attribution, job.licences),
        }


def notices(attribution: dict[str, list[float]], licences: dict[str, dict]) -> list[list[dict]]:
    """Per image, the licence notices of the contributors it drew from (attribution
    above 0: their shard was evaluated for it), largest share first:
    {"contributor", "licence", "attribution", "share"}. Contributors without a stated
    licence are listed with licence None."""
    n = len(next(iter(attribution.values()), []))
    out = []
    for i in range(n):
        drew = sorted(((w[i], c) for c, w in attribution.items() if w[i] > 0), reverse=True)
        out.append([{"contributor": c, "licence": licences.get(c, {}).get("licence"),
                     "attribution": licences.get(c, {}).get("attribution"),
                     "share": round(share, 4)} for share, c in drew])
    return out
