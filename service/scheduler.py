"""Step-level scheduling of generate requests: continuous batching, no head-of-line
blocking.

One sampling thread per worker owns the sampler. A request joins a running
`shards.sampler.Batch` that agrees on (sampler snapshot, steps, scheduler, mode,
routing) and has room (`max_rows` images, `max_jobs` requests), between any two of
its steps, or starts a new one; each request leaves its batch at its last step. The
thread advances one batch by one denoising step at a time, always the batch with the
least work left (images x steps remaining), so a small request waits for at most one
step of a big batch, not for the big batch to finish; a batch that has not advanced
for `starvation_s` seconds goes next, so a stream of small requests cannot stall a
big one for ever. Nothing is learned: a request waits for one step at most before it
joins (and `gather_ms`, 5 ms, when it reaches an idle thread, so that requests sent
together start together).
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
    batch: object  # shards.sampler.Batch
    last_step: float = field(default_factory=time.monotonic)


class StepScheduler:
    """`submit(job)` returns a Future of the job's `SampleOutput`.

    `open_batch(job)` returns an empty `Batch` for the job's settings, `request(job)`
    the job's `SampleRequest`, `group_key(job)` says which jobs may share a batch.
    `on_done(job, batch_requests)` is called as each job finishes; `on_leave(job)`
    whenever a job leaves the scheduler (finished, failed, or cancelled before it
    started), after its last use of the sampler."""

    def __init__(self, open_batch: Callable, request: Callable, group_key: Callable,
                 max_rows: int = 64, max_jobs: int = 64, gather_ms: float = 5.0,
                 starvation_s: float = 2.0, on_done: Callable | None = None,
                 on_leave: Callable | None = None):
        if max_rows < 1 or max_jobs < 1:
            raise ValueError(f"max_rows={max_rows}, max_jobs={max_jobs}; allowed: >= 1 each")
        self._open, self._request, self._key = open_batch, request, group_key
        self.max_rows, self.max_jobs = max_rows, max_jobs
        self.gather_s, self.starvation_s = gather_ms / 1000, starvation_s
        self._on_done = on_done
        self._on_leave = on_leave or (lambda job: None)
        self._queue: list[tuple[object, Future]] = []
        self._active: list[_Active] = []
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

    @property
    def load(self) -> dict:
        """Queued requests, active batches, and images x steps of work left."""
        with self._cond:
            return {"queued": len(self._queue), "batches": len(self._active),
                    "work": sum(a.batch.remaining for a in self._active)}

    # ----------------------------------------------------------------- thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._active and not self._closed:
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
                    self._admit(job, future)
                else:  # its client left before it started
                    self._leave(job)
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

    def _admit(self, job, future: Future) -> None:
        key, request = self._key(job), self._request(job)
        active = next((a for a in self._active if a.key == key and len(a.batch.members) < self.max_jobs
                       and a.batch.rows + request.n <= self.max_rows), None)
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

    def _pick(self) -> _Active:
        now = time.monotonic()
        starved = [a for a in self._active if now - a.last_step >= self.starvation_s]
        if starved:
            return min(starved, key=lambda a: a.last_step)
        return min(self._active, key=lambda a: a.batch.remaining)

    def _advance(self, active: _Active) -> None:
        together = len(active.batch.members)
        try:
            finished = active.batch.step()
        except Exception as err:  # reported to every request of the batch
            self._fail(active, err)
            return
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
