"""Step-level scheduling of generate requests (no head-of-line blocking).

One sampling thread per worker owns the sampler. Requests that arrive together and
agree on (sampler snapshot, steps, scheduler, mode, routing) become one batch (up to
`max_rows` images and `max_jobs` requests); every batch is a `ComposedSampler.iter_batch` generator, and the
thread advances one batch by one denoising step at a time, always the batch with the
least work left (images x steps remaining). So a small request waits for at most one
step of a big one, not for the big one to finish; a batch that has not advanced for
`starvation_s` seconds goes next, so a stream of small requests cannot stall a big
one for ever. The gathering window is fixed (`gather_ms` after the first request
reaches an idle thread), not learned, so it does not grow after slow batches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass
class _Batch:
    jobs: list
    futures: list[Future]
    stepper: object
    rows: int
    steps: int
    done: int = 0
    last_step: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    @property
    def remaining(self) -> int:
        return self.rows * (self.steps - self.done)


class StepScheduler:
    """`submit(job)` returns a Future of the job's `SampleOutput`. `start` is a
    function of a list of jobs returning a step generator (`iter_batch`);
    `group_key(job)` says which jobs may share a batch; `rows(job)` its images."""

    def __init__(self, start: Callable, group_key: Callable, rows: Callable, max_rows: int = 64,
                 max_jobs: int = 64, gather_ms: float = 5.0, starvation_s: float = 2.0,
                 on_batch: Callable[[list, float], None] | None = None):
        self._start, self._key, self._rows = start, group_key, rows
        self.max_rows, self.max_jobs = max_rows, max_jobs
        self.gather_s, self.starvation_s = gather_ms / 1000, starvation_s
        self._on_batch = on_batch
        if max_rows < 1 or max_jobs < 1:
            raise ValueError(f"max_rows={max_rows}, max_jobs={max_jobs}; allowed: >= 1 each")
        self._queue: list[tuple[object, Future]] = []
        self._active: list[_Batch] = []
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
        """Queued requests, active batches and images x steps of work left."""
        with self._cond:
            return {"queued": len(self._queue), "batches": len(self._active),
                    "work": sum(b.remaining for b in self._active)}

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
            self._admit(arrived)
            if self._active:
                self._advance(self._pick())

    def _admit(self, arrived) -> None:
        groups: dict = {}
        for job, future in arrived:
            if future.set_running_or_notify_cancel():
                groups.setdefault(self._key(job), []).append((job, future))
        for members in groups.values():
            batch: list = []
            for job, future in members:  # split a group into batches of <= max_rows images
                full = len(batch) >= self.max_jobs or \
                    sum(self._rows(j) for j, _ in batch) + self._rows(job) > self.max_rows
                if batch and full:
                    self._open(batch)
                    batch = []
                batch.append((job, future))
            if batch:
                self._open(batch)

    def _open(self, members) -> None:
        jobs = [j for j, _ in members]
        futures = [f for _, f in members]
        try:
            stepper, steps = self._start(jobs)
        except Exception as err:
            for f in futures:
                f.set_exception(err)
            return
        batch = _Batch(jobs, futures, stepper, sum(self._rows(j) for j in jobs), steps)
        with self._cond:
            self._active.append(batch)

    def _pick(self) -> _Batch:
        now = time.monotonic()
        starved = [b for b in self._active if now - b.last_step >= self.starvation_s]
        if starved:
            return min(starved, key=lambda b: b.last_step)
        return min(self._active, key=lambda b: b.remaining)

    def _advance(self, batch: _Batch) -> None:
        start = time.perf_counter()
        try:
            next(batch.stepper)
        except StopIteration as done:
            batch.seconds += time.perf_counter() - start
            self._finish(batch, done.value, None)
        except Exception as err:  # reported to every request of the batch
            self._finish(batch, None, err)
        else:
            batch.seconds += time.perf_counter() - start
            batch.done += 1
            batch.last_step = time.monotonic()

    def _finish(self, batch: _Batch, outputs, err) -> None:
        with self._cond:
            self._active.remove(batch)
        if self._on_batch is not None:
            self._on_batch(batch.jobs, batch.seconds)
        for i, future in enumerate(batch.futures):
            if err is not None:
                future.set_exception(err)
            else:
                future.set_result(outputs[i])
