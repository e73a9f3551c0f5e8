"""The service's step scheduler: requests join running batches between steps, small
requests overtake big ones step by step, and every request gets its own images."""

import threading

from conftest import assert_close

from service.scheduler import StepScheduler
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
    sampler = store_copy.load_sampler("cpu")
    scheduler, _ = make(sampler)
    try:
        good = scheduler.submit(Job(SampleRequest(None, 1, 0), 5))
        bad = scheduler.submit(Job(SampleRequest(("zed",), 1, 0), 5))
        assert len(good.result(timeout=60).images) == 1
        try:
            bad.result(timeout=60)
            raise AssertionError("an unknown contributor was sampled")
        except KeyError as err:
            assert "zed" in str(err)
        gate = threading.Event()
        blocker = scheduler.submit(Job(SampleRequest(None, 4, 0), 30))
        cancelled = scheduler.submit(Job(SampleRequest(None, 1, 0), 30))
        cancelled.cancel() and gate.set()
        blocker.result(timeout=120)
        assert cancelled.cancelled() or cancelled.done()
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
