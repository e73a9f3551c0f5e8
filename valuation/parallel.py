"""Where the utilities a valuation misses in its cache are computed: in this process,
in local worker processes (spawned, each with its share of the CPU's threads), or on
a Ray cluster (actors). Each worker rebuilds the utility's source from a spec
(factory, kwargs), so nothing but coalitions and numbers crosses processes.

On Ray, each worker is an actor spread over the cluster's nodes that Ray restarts
when its process or its node dies (at most RAY_RESTARTS times), and a coalition it
was computing is sent again (at most RAY_RETRIES times): U(S) is a pure function of
S and the spec (common random numbers), so computing it twice changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from shards.settings import usable_cpus

_WORKER_SOURCE = None
RAY_RESTARTS = 3  # times Ray restarts a worker actor whose process or node died
RAY_RETRIES = 3  # times a coalition is sent again after its worker died


def _init_worker(factory: Callable, kwargs: dict, threads: int) -> None:
    global _WORKER_SOURCE
    torch.set_num_threads(threads)
    _WORKER_SOURCE = factory(**kwargs)


def _evaluate_in_worker(coalition: frozenset) -> tuple[float, float]:
    start = time.perf_counter()
    value = _WORKER_SOURCE.evaluate(coalition)
    return value, time.perf_counter() - start


def timed(source, coalition: frozenset) -> tuple[float, float]:
    """(U(S), seconds it took) computed here."""
    start = time.perf_counter()
    value = source.evaluate(coalition)
    return value, time.perf_counter() - start


class Backend:
    """Computes U(S) for coalitions with `source` here (workers=1), or in `workers`
    spawned processes, or as `workers` actors of the Ray cluster at `ray_address`
    ("local": start Ray on this machine; needs `pip install '.[ray]'`, and on a cluster
    every node needs this package and the store's path). The pool starts at the
    first batch that needs it and is kept until `close`, so sampled estimators do not
    pay the workers' start-up at every batch.

    Raises:
        ValueError: workers < 1; workers or Ray without a `spec` to rebuild the source.
    """

    def __init__(self, source, workers: int = 1, spec: tuple[Callable, dict] | None = None,
                 ray_address: str | None = None):
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if (workers > 1 or ray_address) and spec is None:
            raise ValueError("worker processes need a spec (factory, kwargs) to rebuild the source")
        self.source, self.workers, self.spec, self.ray_address = source, workers, spec, ray_address
        self._pool = None

    def run(self, coalitions: list[frozenset]) -> Iterator[tuple[float, float]]:
        """(U(S), seconds) for each coalition, in order."""
        if (self.workers == 1 and not self.ray_address) or len(coalitions) < 2:
            for coalition in coalitions:
                yield timed(self.source, coalition)
            return
        pool = self._start()
        if self.ray_address:
            import ray

            # round robin over the actors; each result as soon as it and those before it are in
            refs = [pool[i % len(pool)].evaluate.remote(c) for i, c in enumerate(coalitions)]
            for ref in refs:
                yield ray.get(ref)
            return
        yield from pool.map(_evaluate_in_worker, coalitions)

    def _start(self):
        if self._pool is None:
            factory, kwargs = self.spec
            if self.ray_address:
                self._pool = _ray_actors(self.ray_address, self.workers, factory, kwargs)
            else:
                threads = max(1, usable_cpus() // self.workers)
                self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                                 initializer=_init_worker,
                                                 initargs=(factory, kwargs, threads))
        return self._pool

    def close(self) -> None:
        if self._pool is None:
            return
        if self.ray_address:
            import ray

            for actor in self._pool:
                ray.kill(actor)
        else:
            self._pool.shutdown()
        self._pool = None


def _ray_actors(address: str, workers: int, factory: Callable, kwargs: dict) -> list:
    """`workers` evaluator actors of one CPU each, spread over the cluster's nodes, on
    the Ray cluster at `address` ("local": one started on this machine)."""
    try:
        import ray
    except ImportError as err:
        raise ValueError("ray is not installed: pip install '.[ray]'") from err
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 configure_logging=False)

    @ray.remote(num_cpus=1, max_restarts=RAY_RESTARTS, max_task_retries=RAY_RETRIES)
    class Evaluator:
        def __init__(self):
            _init_worker(factory, kwargs, 1)

        def evaluate(self, coalition: frozenset) -> tuple[float, float]:
            return _evaluate_in_worker(coalition)

        def node(self) -> str:
            """The id of the node it runs on."""
            return ray.get_runtime_context().get_node_id()

        def restarted(self) -> bool:
            """Whether Ray restarted it (its process or node died)."""
            return ray.get_runtime_context().was_current_actor_reconstructed

    return [Evaluator.options(scheduling_strategy="SPREAD").remote() for _ in range(workers)]
