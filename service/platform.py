"""The service without HTTP: one store, its database, and this worker's parts.

    generation.py  licensed generation: admission, cost, checks, ledger, response
    scheduler.py   continuous batching of generate requests (one sampling thread)
    forget.py      forget requests and purge jobs, with crash recovery
    jobs.py        admin jobs (purge, add, value) and the runner that executes them
    credit.py      what each role may read: contributors, attribution, credit, history

`Platform` wires them together; `app.py` adapts it to BentoML and the CLI calls it
directly (`cdm forget`, `cdm jobs`, `cdm payout`).

Several workers (processes) may serve one store. Each checks the store's generation
before every request (one `stat`) and reloads its sampler when the live set changed,
so an exclusion acknowledged by any worker holds for every request that starts after
the acknowledgement, in every worker; a purge waits until no worker holds a request
that started before the exclusion (forget.py).

Hosts: with the database on PostgreSQL (CDM_DATABASE_URL) and the store on a volume
every host mounts, the same holds across hosts: the store's locks are advisory locks
(shards/coordination.py), requests in flight and jobs are rows of the one database,
and a listener thread wakes the job runners at every other host's manifest commit.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path

from shards import ShardStore
from shards.coordination import CHANNEL
from shards.settings import WORKER_HEARTBEAT_SECONDS

from .auth import Principal
from .context import Shared, shared
from .credit import Credit
from .forget import Forgetting
from .generation import Generation, GenerationJob, Limits, LiveSampler
from .jobs import Jobs
from .ledger import Ledger
from .metrics import ServiceMetrics
from .paths import allowed_roots
from .scheduler import StepScheduler


class Platform:
    """One store, its database, this worker's sampler, step scheduler and job runner.

    `serve=False` (the CLI) loads no sampler and starts no threads: call `run_jobs()`
    to execute queued and orphaned jobs in the calling thread. `parts`: the database
    handle and key verifier (default: this process's, which its Gate uses too)."""

    def __init__(self, store_path: str | Path, device: str | None = None, serve: bool = True,
                 limits: Limits | None = None, parts: Shared | None = None):
        self.store = ShardStore.open(store_path)
        self.device = device
        parts = parts or shared(self.store.root)
        self.db, self.verify = parts.db, parts.verify
        self.metrics = ServiceMetrics()
        self.limits = limits or Limits.from_env()
        # a random instance id (host and pid only help a person reading the tables):
        # alive while its heartbeat is fresh (forget.py)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self._wakes = {"purge": threading.Event(), "work": threading.Event()}
        self._closed = threading.Event()
        self.live = LiveSampler(self.store, device)
        self.ledger = Ledger(self.db)
        self.generation = Generation(self.store, self.db, self.live, self.metrics, self.limits,
                                     self.worker, self.ledger)
        self.forgetting = Forgetting(self.store, self.db, self.live, self.metrics, device,
                                     self._wakes["purge"], self._closed)
        self.jobs = Jobs(self.store, self.db, self.live if serve else None, self.forgetting,
                         allowed_roots(self.store.root), device, self._wakes, self._closed)
        self.reads = Credit(self.store, self.db)
        self._scheduler, self._runners, self._heart, self._listener = None, [], None, None
        if serve:
            self.db.heartbeat(self.worker)
            self._heart = threading.Thread(target=self._beat, name="cdm-heartbeat", daemon=True)
            self._heart.start()
            self.live.sync()
            self.metrics.watch_shard_cache(lambda: self.live.sampler.bank.stats()
                                           if self.live.sampler else {}, self.live.held)
            g = self.generation
            self._scheduler = StepScheduler(g.open_batch, lambda job: job.request, g.batch_key,
                                            owner=lambda job: job.owner,
                                            cancelled=lambda job: job.cancelled.is_set(),
                                            max_rows=self.limits.batch_rows,
                                            max_jobs=self.limits.batch_requests,
                                            max_batches=self.limits.active_batches,
                                            on_done=g.observe, on_cancel=g.refund,
                                            on_leave=g.release_later)
            if not self.db.sqlite:  # other hosts' manifest commits wake the runners now
                self._listener = threading.Thread(
                    target=self.db.listen, args=(CHANNEL, self._notified, self._closed),
                    name="cdm-listen", daemon=True)
                self._listener.start()
            for lane, wake in self._wakes.items():  # purges never wait for an add or valuation
                runner = threading.Thread(target=self.jobs.loop, args=(lane,),
                                          name=f"cdm-jobs-{lane}", daemon=True)
                wake.set()  # recover what a crash interrupted, now
                runner.start()
                self._runners.append(runner)

    def close(self) -> None:
        """Stop the sampling thread and the job runner (a running job finishes first,
        up to 10 s; anything later is recovered by the next start)."""
        self._closed.set()
        for wake in self._wakes.values():
            wake.set()
        if self._scheduler is not None:
            self._scheduler.close()
        for runner in self._runners:
            runner.join(timeout=10)
        self.ledger.close()
        if self._listener is not None:
            self._listener.join(timeout=10)
        if self._heart is not None:
            self._heart.join(timeout=10)
            self.db.drop_workers([self.worker])  # its requests are released or never will be

    def _notified(self, payload: str | None) -> None:
        """A manifest commit on some host (or a reconnection): each runner refreshes
        the store and this worker's sampler, dropping a forgotten contributor's weights
        and loading an added one's, instead of at its next poll."""
        for wake in self._wakes.values():
            wake.set()

    def _beat(self) -> None:
        """Tell every other worker this one is alive, every few seconds, whatever the
        sampling thread and the job runner are busy with."""
        while not self._closed.wait(WORKER_HEARTBEAT_SECONDS):
            try:
                self.db.heartbeat(self.worker)
            except Exception:  # noqa: BLE001 - a missed beat is retried; never kill the thread
                pass

    # ------------------------------------------------------------ generation
    def generate(self, principal: Principal, contributors: list[str] | None = None,
                 n: int = 4, **request) -> dict:
        """Sample with exactly the requested contributors (default: every live one the
        key is licensed for), record the request in the ledger, return PNGs (base64)
        and per-sample attribution keyed by contributor id. `request`: steps, seed,
        mode, scheduler, routing, top_k, mass, label (generation.py: checks, errors)."""
        job = self.prepare_generation(principal, contributors, n, **request)
        if self._scheduler is not None:  # it releases the job when the job leaves it
            out = self._scheduler.submit(job).result()
        else:
            try:
                [out] = self.generation.sample_here([job])
            finally:
                self.release(job.seq)
            if isinstance(out, Exception):
                raise out
        return self.finish_generation(job, out)

    def prepare_generation(self, principal: Principal, *args, **kwargs) -> GenerationJob:
        """Check, charge and register a generate request (`Generation.prepare`)."""
        return self.generation.prepare(principal, *args, **kwargs)

    def submit(self, job: GenerationJob):
        """The Future of a prepared job's output, from this worker's step scheduler,
        which releases the job (`release`) when it leaves, whatever the outcome."""
        try:
            return self._scheduler.submit(job)
        except BaseException:
            self.release(job.seq)
            raise

    def release(self, seq: int) -> None:
        """The request `seq` no longer holds its sampler snapshot (idempotent)."""
        self.generation.release(seq)

    def cancel(self, job: GenerationJob) -> None:
        """The client of `job` left: the scheduler drops it before its next step and
        refunds the steps it did not take."""
        job.cancelled.set()
        if self._scheduler is not None:
            self._scheduler.wake()

    def finish_generation(self, job: GenerationJob, out) -> dict:
        """Ledger row (durable before returning), metrics, and the response body."""
        return self.generation.finish(job, out)

    # --------------------------------------------------------- forget, jobs
    def forget(self, principal: Principal, contributor_id: str) -> dict:
        """Exclude now, purge in the background (forget.py)."""
        return self.forgetting.forget(principal, contributor_id)

    def add_contributor(self, principal: Principal, folder: str, kind: str | None = None,
                        anywhere: bool = False) -> dict:
        """Admin: validate a data folder now, train it in the background (jobs.py)."""
        return self.jobs.add_contributor(principal, folder, kind, anywhere)

    def value(self, principal: Principal, heldout: str | None = None, **settings) -> dict:
        """Admin: start a valuation job (jobs.py)."""
        return self.jobs.value(principal, heldout, **settings)

    def job(self, principal: Principal, job_id: str) -> dict:
        """A job, to an admin or to the contributor whose forgetting it is."""
        return self.jobs.job(principal, job_id)

    def run_jobs(self, lane: str | None = None) -> int:
        """Run queued and orphaned jobs in this thread (of one lane, "purge" or "work",
        or both); returns how many ran."""
        return self.jobs.run(lane)

    # ----------------------------------------------------------------- reads
    def contributors(self) -> list[dict]:
        return self.reads.contributors()

    def attribution(self, principal: Principal, request_id: str) -> dict:
        return self.reads.attribution(principal, request_id)

    def credit(self, principal: Principal) -> dict:
        return self.reads.credit(principal)

    def payout(self) -> dict:
        """The payout policy and the live contributors' shares under it."""
        self.store.refresh()
        return self.reads.payout(set(self.store.contributor_ids))

    def set_payout_policy(self, principal: Principal, property: str, method: str,
                          alpha: float | None = None, beta: float | None = None) -> dict:
        return self.reads.set_payout_policy(principal, property, method, alpha, beta)

    def history(self, principal: Principal, limit: int = 100, before: float | None = None) -> dict:
        return self.reads.history(principal, limit, before)
