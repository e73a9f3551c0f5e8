"""Step-level scheduling of generate requests: continuous batching, shared fairly.

One sampling thread per worker owns the sampler. A request joins a running
`shards.batch.Batch` that agrees on (sampler snapshot, scheduler, mode, routing),
whatever its number of steps, and has room (`max_rows` images, `max_jobs`
requests), between any two of its steps, or starts a new one while fewer than
`max_batches` run (else it waits for one to finish); each request leaves its batch
at its last step.

The thread advances one batch by one denoising step at a time, and chooses it by
fair queueing over owners (API keys): each owner has received some service, the
seconds of the steps its requests took part in, split among a step's requests by
their rows; the next step goes to the batch holding the owner that received least,
and among equals to the batch with the least work left (images x steps remaining). An
owner that becomes active starts at the least service any active owner received, so
idle time banks nothing. So one key's flood of small requests gets half the sampling
time beside another key's big request, not all of it, and a small request of a quiet
key still waits at most about one step of a big batch. A batch that has not moved for
`starvation_s` (2 s) goes next whatever its owners received, so no request waits for
ever behind its own key's stream of small ones.

A request whose client left is dropped before the next step (`cancelled(job)`), with
`on_cancel(job, steps_done)` to refund what it did not use; nothing is learned from
past batches. A request reaching an idle thread waits `gather_ms` (5 ms), so that
requests sent together start together.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass
class _Active:
    key: object
    batch: object  # shards.batch.Batch
    last_step: float = field(default_factory=time.monotonic)


@dataclass
class _Owners:
    """Service received (seconds) per owner, and the owners now active."""

    received: dict = field(default_factory=dict)

    def join(self, owner, active: set) -> None:
        """`owner` starts (again) at the least service an active owner received."""
        floor = min((self.received.get(o, 0.0) for o in active), default=0.0)
        self.received[owner] = max(self.received.get(owner, 0.0), floor)

    def charge(self, shares: dict) -> None:
        for owner, seconds in shares.items():
            self.received[owner] = self.received.get(owner, 0.0) + seconds


class StepScheduler:
    """`submit(job)` returns a Future of the job's `SampleOutput`.

    `open_batch(job)` returns an empty `Batch` for the job's settings, `request(job)`
    the job's `SampleRequest`, `group_key(job)` says which jobs may share a batch,
    `owner(job)` whose service the job counts as (None: one owner for all),
    `cancelled(job)` whether its client left. `on_done(job, batch_requests)` is called
    as each job finishes; `on_leave(job)` whenever a job leaves the scheduler
    (finished, failed, cancelled), after its last use of the sampler;
    `on_cancel(job, steps_done)` when a cancelled job is dropped."""

    def __init__(self, open_batch: Callable, request: Callable, group_key: Callable,
                 owner: Callable | None = None, cancelled: Callable | None = None,
                 max_rows: int = 64, max_jobs: int = 64, max_batches: int = 8,
                 gather_ms: float = 5.0, starvation_s: float = 2.0,
                 on_done: Callable | None = None,
                 on_leave: Callable | None = None, on_cancel: Callable | None = None):
        if max_rows < 1 or max_jobs < 1 or max_batches < 1:
            raise ValueError(f"max_rows={max_rows}, max_jobs={max_jobs}, "
                             f"max_batches={max_batches}; allowed: >= 1 each")
        self._open, self._request, self._key = open_batch, request, group_key
        self._owner = owner or (lambda job: None)
        self._cancelled = cancelled or (lambda job: False)
        self.max_rows, self.max_jobs, self.max_batches = max_rows, max_jobs, max_batches
        self.gather_s, self.starvation_s = gather_ms / 1000, starvation_s
        self._on_done = on_done
        self._on_leave = on_leave or (lambda job: None)
        self._on_cancel = on_cancel or (lambda job, done: None)
        self._queue: list[tuple[object, Future]] = []
        self._waiting: list[tuple[object, Future]] = []  # admitted to run, no batch free yet
        self._active: list[_Active] = []
        self.owners = _Owners()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="cdm-sampler", daemon=True)
        self._thread.start()

    def submit(self, job) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the sampler is shut down")
            self._queue.append((job, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def wake(self) -> None:
        """Look at the requests again now (one was cancelled)."""
        with self._cond:
            self._cond.notify()

    @property
    def load(self) -> dict:
        """Queued requests, active batches, and images x steps of work left."""
        with self._cond:
            return {"queued": len(self._queue) + len(self._waiting), "batches": len(self._active),
                    "work": sum(a.batch.remaining for a in self._active)}

    # ----------------------------------------------------------------- thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._active and not self._waiting \
                        and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                idle = not self._active
            if idle and self.gather_s > 0:
                time.sleep(self.gather_s)  # let requests sent together arrive together
            with self._cond:
                arrived, self._queue = self._queue, []
            for job, future in arrived:
                if future.set_running_or_notify_cancel():
                    self._waiting.append((job, future))
                else:  # its client left before it started
                    self._leave(job)
            self._admit_waiting()
            self._drop_cancelled()
            if self._active:
                active = self._pick()
                try:
                    self._advance(active)
                except Exception as err:  # never let the sampling thread die
                    self._fail(active, err)

    def _leave(self, job) -> None:
        try:
            self._on_leave(job)
        except Exception:  # noqa: BLE001 - a bookkeeping failure must not stop sampling
            pass

    def _fail(self, active: _Active, err: Exception) -> None:
        """Every request still in `active` gets `err`; the batch is dropped."""
        if active in self._active:
            self._active.remove(active)
        for member in active.batch.members:
            job, future = member.handle
            self._leave(job)
            if not future.done():
                future.set_exception(err)

    def _admit_waiting(self) -> None:
        """Place waiting requests in order: in a batch with room, or in a new batch while
        fewer than `max_batches` run; the others wait for the next step."""
        still = []
        for job, future in self._waiting:
            if self._cancelled(job):
                self._cancel(job, future, 0)
                continue
            key, request = self._key(job), self._request(job)
            active = next((a for a in self._active if a.key == key
                           and len(a.batch.members) < self.max_jobs
                           and a.batch.rows + request.n <= self.max_rows), None)
            if active is None and len(self._active) >= self.max_batches:
                still.append((job, future))
                continue
            owner = self._owner(job)
            if owner not in self._active_owners():
                self.owners.join(owner, self._active_owners())
            try:
                if active is None:
                    active = _Active(key, self._open(job))
                    self._active.append(active)
                active.batch.add(request, handle=(job, future))
            except Exception as err:  # bad request: reported to it alone
                self._leave(job)
                future.set_exception(err)
                if active is not None and active.batch.rows == 0 and active in self._active:
                    self._active.remove(active)
        self._waiting = still

    def _active_owners(self) -> set:
        return {self._owner(m.handle[0]) for a in self._active for m in a.batch.members}

    def _cancel(self, job, future: Future, done: int) -> None:
        try:
            self._on_cancel(job, done)
        except Exception:  # noqa: BLE001 - a refund failure must not stop sampling
            pass
        self._leave(job)
        if not future.done():
            future.cancel() or future.set_exception(CancelledRequest("the client left"))

    def _drop_cancelled(self) -> None:
        """Requests whose client left leave their batch before the next step."""
        for active in list(self._active):
            for member in list(active.batch.members):
                job, future = member.handle
                if self._cancelled(job):
                    active.batch.remove(member.handle)
                    self._cancel(job, future, member.done)
            if active.batch.rows == 0:
                self._active.remove(active)

    def _pick(self) -> _Active:
        """The batch holding the owner that received least service; among equals, the
        one with the least work left; but a batch that has not moved for
        `starvation_s` first (one owner's small requests cannot stall its own big one
        for ever)."""
        now = time.monotonic()
        starved = [a for a in self._active if now - a.last_step >= self.starvation_s]
        if starved:
            return min(starved, key=lambda a: a.last_step)
        received = self.owners.received

        def rank(active: _Active):
            least = min(received.get(self._owner(m.handle[0]), 0.0) for m in active.batch.members)
            return least, active.batch.remaining

        return min(self._active, key=rank)

    def _advance(self, active: _Active) -> None:
        together = len(active.batch.members)
        rows = {}  # owner -> rows in this step
        for m in active.batch.members:
            owner = self._owner(m.handle[0])
            rows[owner] = rows.get(owner, 0) + m.request.n
        start = time.perf_counter()
        try:
            finished = active.batch.step()
        except Exception as err:  # reported to every request of the batch
            self._fail(active, err)
            return
        seconds, total = time.perf_counter() - start, sum(rows.values())
        self.owners.charge({o: seconds * r / total for o, r in rows.items()})
        active.last_step = time.monotonic()
        for (job, future), output in finished:
            self._leave(job)
            if self._on_done is not None:
                try:
                    self._on_done(job, together)
                except Exception:  # noqa: BLE001 - metrics must not lose an answer
                    pass
            if not future.done():
                future.set_result(output)
        if active.batch.rows == 0:
            self._active.remove(active)


class CancelledRequest(Exception):
    """A request dropped because its client left."""
