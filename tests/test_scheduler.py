"""The service's step scheduler: requests join running batches between steps, small
requests overtake big ones step by step, and every request gets its own images."""

import threading
import time

import pytest
from conftest import assert_close

from service.scheduler import CancelledRequest, StepScheduler
from shards.routing import Routing
from shards.sampler import SampleRequest


class Job:
    def __init__(self, request, steps):
        self.request, self.steps = request, steps


def make(sampler, **kw):
    together = {}

    def done(job, n):
        together[id(job)] = n

    scheduler = StepScheduler(lambda job: sampler.batch(job.steps, routing=Routing()),
                              lambda job: job.request, lambda job: job.steps, on_done=done, **kw)
    return scheduler, together


def test_a_small_request_overtakes_a_big_one(store_copy):
    sampler = store_copy.load_sampler("cpu")
    scheduler, _ = make(sampler)
    try:
        big = scheduler.submit(Job(SampleRequest(None, 8, 0), 200))
        while not scheduler.load["batches"]:
            pass
        small = scheduler.submit(Job(SampleRequest(("a",), 1, 1), 3))
        out = small.result(timeout=120)
        [active] = scheduler._active
        taken = active.batch.members[0].done
        assert not big.done() and taken <= 3 + 2, taken  # the big batch moved a step or so
        assert_close(out.images, sampler.sample_batch([SampleRequest(("a",), 1, 1)], 3)[0].images)
        assert len(big.result(timeout=300).images) == 8
    finally:
        scheduler.close()


def test_requests_join_a_running_batch_and_keep_their_images(store_copy):
    sampler = store_copy.load_sampler("cpu")
    scheduler, together = make(sampler, gather_ms=0)
    try:
        jobs = [Job(SampleRequest(None, 2, seed), 40) for seed in range(3)]
        first = scheduler.submit(jobs[0])
        while not scheduler.load["batches"]:
            pass
        rest = [scheduler.submit(j) for j in jobs[1:]]
        outs = [f.result(timeout=300) for f in [first, *rest]]
        assert scheduler.load == {"queued": 0, "batches": 0, "work": 0}
        assert max(together.values()) >= 2  # the later requests joined the first one's batch
        for job, out in zip(jobs, outs, strict=True):
            alone = sampler.sample_batch([job.request], 40)[0]
            assert_close(out.images, alone.images)
            assert_close(out.attribution_mean, alone.attribution_mean)
    finally:
        scheduler.close()


def test_a_bad_request_fails_alone_and_cancelled_ones_are_skipped(store_copy):
    """A request naming an unknown contributor fails alone; a request cancelled before
    it started (its future cancelled, or its client gone) is never sampled: it never
    joins a batch, and it leaves the scheduler (its release runs)."""
    sampler = store_copy.load_sampler("cpu")
    joined, left = [], []
    scheduler = StepScheduler(lambda job: sampler.batch(job.steps, routing=Routing()),
                              lambda job: joined.append(job) or job.request,
                              lambda job: job.steps, cancelled=lambda job: job.cancelled.is_set(),
                              on_leave=left.append)
    try:
        good = scheduler.submit(Owned(SampleRequest(None, 1, 0), 5, "A"))
        bad = scheduler.submit(Owned(SampleRequest(("zed",), 1, 0), 5, "A"))
        assert len(good.result(timeout=60).images) == 1
        with pytest.raises(KeyError, match="zed"):
            bad.result(timeout=60)
        blocker_job = Owned(SampleRequest(None, 4, 0), 30, "A")
        blocker = scheduler.submit(blocker_job)
        while blocker_job not in joined:  # the blocker runs: the next ones queue behind it
            time.sleep(0.01)
        first, second = Owned(SampleRequest(None, 1, 1), 30, "A"), Owned(SampleRequest(None, 1, 2), 30, "A")
        first.cancelled.set()  # its client left
        cancelled_future = scheduler.submit(second)
        assert cancelled_future.cancel()  # cancelled before it started
        gone_future = scheduler.submit(first)
        blocker.result(timeout=120)
        with pytest.raises(CancelledRequest):
            gone_future.result(timeout=60)
        assert first not in joined and second not in joined  # never sampled
        assert first in left and second in left  # and released
    finally:
        scheduler.close()


def test_a_left_clients_release_runs_off_the_event_loop():
    """When a client leaves while its request is being admitted, what the request
    registered is released in a worker thread, not on the event loop (the write can
    wait up to 30 s for the database lock)."""
    import asyncio
    import threading

    from service.app import release_when_prepared

    threads = []

    class Platform:
        def release(self, seq):
            threads.append((seq, threading.current_thread()))

    class Prepared:
        seq = 7

    async def main():
        loop_thread = threading.current_thread()
        done = asyncio.get_running_loop().create_future()
        done.set_result(Prepared())
        release_when_prepared(Platform())(done)
        for _ in range(100):
            if threads:
                break
            await asyncio.sleep(0.01)
        return loop_thread

    loop_thread = asyncio.run(main())
    assert len(threads) == 1 and threads[0][0] == 7 and threads[0][1] is not loop_thread


class Owned(Job):
    def __init__(self, request, steps, owner):
        super().__init__(request, steps)
        self.owner, self.cancelled = owner, threading.Event()


def make_owned(sampler, **kw):
    return StepScheduler(lambda job: sampler.batch(job.steps, routing=Routing()),
                         lambda job: job.request, lambda job: job.steps,
                         owner=lambda job: job.owner,
                         cancelled=lambda job: job.cancelled.is_set(), **kw)


def test_a_flood_from_one_key_gets_half_the_time_not_all_of_it(store_copy):
    """Key A floods one-step requests while key B's big request runs: B's batch gets
    about half the sampling time (fair queueing over keys). The scheduler of before,
    which always advanced the batch with the least work left, moved B once every 2 s."""
    sampler = store_copy.load_sampler("cpu")
    scheduler = make_owned(sampler, gather_ms=0)
    flood, stop = [], threading.Event()

    def flooder():
        while not stop.is_set():
            if scheduler.load["queued"] < 4:
                flood.append(scheduler.submit(Owned(SampleRequest(("a",), 1, 0), 1, "A")))
            time.sleep(0.001)  # a busy loop here would take the GIL from the sampler

    thread = threading.Thread(target=flooder)
    try:
        thread.start()
        while len(flood) < 8:
            time.sleep(0.01)
        big = scheduler.submit(Owned(SampleRequest(None, 8, 0), 30, "B"))
        assert len(big.result(timeout=300).images) == 8
        stop.set()
        thread.join()
        received = scheduler.owners.received
        share = received["B"] / (received["A"] + received["B"])
        print(f"B's share of the sampling time: {share:.2f}")
        assert share > 0.35, (share, received)  # B's 30 steps within about twice their time
        assert sum(f.done() for f in flood) > 30  # and A was served all along
    finally:
        stop.set()
        scheduler.close()


def test_a_request_whose_client_left_is_dropped_and_its_steps_refunded(store_copy):
    sampler = store_copy.load_sampler("cpu")
    cancelled = []
    scheduler = make_owned(sampler, on_cancel=lambda job, done: cancelled.append((job, done)))
    try:
        job = Owned(SampleRequest(None, 2, 0), 500, "A")
        future = scheduler.submit(job)
        while not scheduler.load["batches"]:
            pass
        job.cancelled.set()
        scheduler.wake()
        with pytest.raises(CancelledRequest):
            future.result(timeout=60)
        [(gone, done)] = cancelled
        assert gone is job and 0 <= done < 500  # dropped mid-way, not run to its end
        assert scheduler.load == {"queued": 0, "batches": 0, "work": 0}
        other = scheduler.submit(Owned(SampleRequest(None, 1, 1), 3, "A"))  # still serving
        assert len(other.result(timeout=60).images) == 1
    finally:
        scheduler.close()


def test_active_batches_are_bounded(store_copy):
    """Requests that fit no running batch wait while `max_batches` run."""
    sampler = store_copy.load_sampler("cpu")
    scheduler = make_owned(sampler, max_batches=2)
    seen = []
    try:
        futures = [scheduler.submit(Owned(SampleRequest(None, 1, s), 10 + s, "A"))
                   for s in range(4)]  # four step counts: four batch keys
        while not all(f.done() for f in futures):
            seen.append(scheduler.load["batches"])
            time.sleep(0.005)
        assert max(seen) <= 2 and all(len(f.result().images) == 1 for f in futures)
    finally:
        scheduler.close()
