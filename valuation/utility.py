"""Utilities U(S): a global property of the samples of a model for coalition S.

`CachedUtility` is what the estimators in `shapley.py` call. It wraps a *source*
(how U(S) is obtained: composing the shards in S, fine-tuning a pruned model on D_S,
retraining on D_S, or a closed-form game), looks each coalition up in a disk cache,
and computes the misses, in local worker processes when asked.

Common random numbers: every source samples with the same seed for every S, so the
initial noise x_T and the sampler's step noise are the same across coalitions.

U(empty set) is the property of the prior's samples: x_T ~ N(0, I) itself (the same
x_T every coalition starts from), clipped to [-1, 1], i.e. what the sampler returns
with no denoiser. It is the same for every method, so their values are comparable.

Cache: one JSON file per (source key) under STORE/valuation/cache/<method>/. An
entry records `depends_on`, the contributors whose data shaped the number (for
composition: S with the per-contributor heads router; every contributor the joint
classifier was trained on with that router). Forgetting c deletes
every entry that depends on c, and nothing else that can say what it depends on:
temporary files of interrupted writes, and entries or sample files that cannot be
read, are deleted too.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from shards import ShardStore
from shards.store import write_json_atomic

from .properties import load_property


class UtilitySource(Protocol):
    """How U(S) is obtained. The contract every source keeps (tests/test_valuation.py
    holds each one to it):

    * `key(S)`: a sha256 hex digest naming the number U(S) exactly. Two calls give
      equal keys only if `evaluate(S)` would give the same number: it covers the
      method, the property (with the evaluator's weights), every sampling setting
      (n, steps, seed, scheduler), the training settings, and the weights or data
      hashes of whatever S's number is computed from. It is the cache's file name.
    * `depends_on(S)`: the sorted contributor ids whose data shaped U(S), a superset
      of S (more when a shared part saw others: the joint classifier, a monolith
      trained on everyone). Forgetting c deletes every cached entry whose
      `depends_on` names c; a source that under-reports leaves a trace of c behind.
    * `evaluate(S)`: U(S) as a float; deterministic for a given key.
    * `players`: the live contributors, sorted; `method` and `property`: names.
    """

    method: str
    players: tuple[str, ...]
    property: str

    def key(self, coalition: frozenset) -> str: ...
    def depends_on(self, coalition: frozenset) -> list[str]: ...
    def evaluate(self, coalition: frozenset) -> float: ...


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def prior_images(n: int, image_shape, seed: int) -> torch.Tensor:
    """The x_T that `ComposedSampler` draws first for `seed`, mapped to [0, 1]."""
    x = torch.randn((n, *image_shape), generator=torch.Generator().manual_seed(seed))
    return (x.clamp(-1, 1) + 1) / 2


# Temporary files under the cache: ours and write_json_atomic's (`.<name>.<random>.tmp`),
# and safetensors' own (`.tmpXXXXXX`, which save_file writes and then renames).
TMP_PATTERNS = ("*.tmp", ".tmp*")


class UtilityCache:
    """JSON entries under `root/<method>/<key>.json`, written atomically; sampled
    images under `root/samples/<key>.safetensors` (so every property of a coalition
    is measured on one sampling run), with `depends_on` in the file's metadata."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def get(self, method: str, key: str) -> dict | None:
        path = self.root / method / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, method: str, key: str, entry: dict) -> None:
        """Write one entry atomically (through a `.<name>.<random>.tmp` file). If a
        concurrent `drop` deleted the temporary file, the entry is not cached."""
        (self.root / method).mkdir(parents=True, exist_ok=True)
        try:
            write_json_atomic(self.root / method / f"{key}.json", entry)
        except FileNotFoundError:
            pass  # a forget ran meanwhile: caching is optional, publishing untrusted is not

    def entries(self) -> list[tuple[Path, dict]]:
        return [(p, json.loads(p.read_text())) for p in sorted(self.root.glob("*/*.json"))]

    def get_images(self, key: str) -> torch.Tensor | None:
        path = self.root / "samples" / f"{key}.safetensors"
        return load_file(str(path))["images"] if path.exists() else None

    def put_images(self, key: str, images: torch.Tensor, depends_on: list[str]) -> None:
        """Write the samples of `key` atomically, through a `.<key>.<random>.tmp` file
        (unique, so that concurrent writers of one key do not share it). If a concurrent
        `drop` deleted the temporary file, the samples are not cached."""
        folder = self.root / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            save_file({"images": images.contiguous()}, str(tmp),
                      metadata={"depends_on": json.dumps(sorted(depends_on))})
            os.replace(tmp, folder / f"{key}.safetensors")
        except FileNotFoundError:
            pass  # a forget ran meanwhile (see `put`)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def drop(self, contributor_id: str) -> int:
        """Delete every entry and every sample file that depends on `contributor_id`'s
        data, and every file that cannot say what it depends on: the temporary files of
        writes in progress or interrupted (`TMP_PATTERNS`, whoever they are for: a
        write in progress then skips caching), entries and sample files that cannot be
        read. Returns how many files were deleted."""
        dropped = 0
        for path in sorted(self.root.glob("*/*.json")):
            try:
                depends_on = json.loads(path.read_text())["depends_on"]
            except (OSError, ValueError, KeyError, TypeError):
                depends_on = None  # unreadable: untrusted
            if depends_on is None or contributor_id in depends_on:
                dropped += _unlink(path)
        for path in sorted(self.root.glob("samples/*.safetensors")):
            try:
                with safe_open(str(path), "pt") as f:
                    depends_on = json.loads(f.metadata()["depends_on"])
            except Exception:  # truncated or foreign; safetensors raises its own errors
                depends_on = None
            if depends_on is None or contributor_id in depends_on:
                dropped += _unlink(path)
        for path in sorted({p for pattern in TMP_PATTERNS for p in self.root.rglob(pattern)}):
            if path.is_file():
                dropped += _unlink(path)
        return dropped


def _unlink(path: Path) -> int:
    """Delete file `path`; 1 if this call deleted it, 0 if it was gone already."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def store_cache(store: ShardStore) -> UtilityCache:
    return UtilityCache(store.root / "valuation" / "cache")


_WORKER_SOURCE: UtilitySource | None = None


def _init_worker(factory: Callable, kwargs: dict, threads: int) -> None:
    global _WORKER_SOURCE
    torch.set_num_threads(threads)
    _WORKER_SOURCE = factory(**kwargs)


def _evaluate_in_worker(coalition: frozenset) -> tuple[float, float]:
    start = time.perf_counter()
    value = _WORKER_SOURCE.evaluate(coalition)
    return value, time.perf_counter() - start


class CachedUtility:
    """U(S) for the estimators: cache lookups, then the misses computed by `source`
    in this process (workers=1) or in `workers` spawned processes, each of which
    rebuilds the source from `spec = (factory, kwargs)`.

    `evaluations` counts coalitions computed here, `hits` those read from the cache;
    `seconds[S]` is what computing U(S) cost (now or when it was cached), and
    `touched` the coalitions asked for since the caller last cleared it.
    """

    def __init__(self, source: UtilitySource, cache: UtilityCache | None = None,
                 workers: int = 1, spec: tuple[Callable, dict] | None = None,
                 progress: bool = False, ray_address: str | None = None):
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if (workers > 1 or ray_address) and spec is None:
            raise ValueError("worker processes need a spec (factory, kwargs) to rebuild the source")
        self.source, self.cache, self.workers, self.spec = source, cache, workers, spec
        self.ray_address = ray_address
        self.players, self.property = source.players, source.property
        self.progress = progress
        self.evaluations = self.hits = 0
        self.seconds: dict[frozenset, float] = {}
        self.touched: set[frozenset] = set()
        self._memo: dict[frozenset, float] = {}
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, coalition) -> float:
        return self.many([frozenset(coalition)])[0]

    def many(self, coalitions: list[frozenset]) -> list[float]:
        coalitions = [frozenset(c) for c in coalitions]
        self.touched.update(coalitions)
        unknown = set(coalitions) - set(self._memo)
        missing = []
        for coalition in sorted(unknown, key=lambda c: (len(c), sorted(c))):
            bad = coalition - set(self.players)
            if bad:
                raise ValueError(f"coalition has players {sorted(bad)} not in {list(self.players)}")
            entry = self.cache.get(self.source.method, self.source.key(coalition)) if self.cache else None
            if entry is None:
                missing.append(coalition)
            else:
                self._memo[coalition] = entry["value"]
                self.seconds[coalition] = entry["seconds"]
                self.hits += 1
        for coalition, (value, seconds) in zip(missing, self._compute(missing), strict=True):
            self._memo[coalition] = value
            self.evaluations += 1
            self.seconds[coalition] = seconds
            if self.cache:
                self.cache.put(self.source.method, self.source.key(coalition), {
                    "method": self.source.method, "property": self.property,
                    "coalition": sorted(coalition), "value": value, "seconds": seconds,
                    "depends_on": sorted(self.source.depends_on(coalition)),
                    "created_at": time.time()})
        return [self._memo[c] for c in coalitions]

    def _compute(self, missing: list[frozenset]):
        desc = f"U(S) {self.source.method}/{self.property}"
        bar = tqdm(total=len(missing), desc=desc, disable=not self.progress or not missing,
                   leave=False)
        if (self.workers == 1 and not self.ray_address) or len(missing) < 2:
            for coalition in missing:
                start = time.perf_counter()
                value = self.source.evaluate(coalition)
                bar.update()
                yield value, time.perf_counter() - start
        else:
            pool = self._worker_pool()
            run = pool.imap if self.ray_address else pool.map
            for result in run(_evaluate_in_worker, missing):
                bar.update()
                yield result
        bar.close()

    def _worker_pool(self):
        """Started at the first batch that needs it and kept until `close`, so that
        sampled estimators do not pay the workers' start-up at every batch: local
        spawned processes, or actors of a Ray cluster (`ray_address`: an address, or
        "local" to start Ray on this machine; needs `pip install '.[ray]'`, and on a
        cluster every node needs this package and the store's path)."""
        if self._pool is None:
            factory, kwargs = self.spec
            if self.ray_address:
                try:
                    from ray.util.multiprocessing import Pool
                except ImportError as err:
                    raise ValueError("ray is not installed: pip install '.[ray]'") from err
                address = None if self.ray_address == "local" else self.ray_address
                self._pool = Pool(self.workers, initializer=_init_worker,
                                  initargs=(factory, kwargs, 1), ray_address=address)
            else:
                threads = max(1, (os.cpu_count() or 1) // self.workers)
                self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                                 initializer=_init_worker,
                                                 initargs=(factory, kwargs, threads))
        return self._pool

    def close(self) -> None:
        if self._pool is None:
            return
        if self.ray_address:
            self._pool.terminate()
        else:
            self._pool.shutdown()
        self._pool = None


class GameUtility:
    """A closed-form game U(S) = fn(S) as a source (tests, examples)."""

    method = "game"

    def __init__(self, players, fn: Callable[[frozenset], float], name: str = "game"):
        self.players, self.fn, self.property = tuple(players), fn, name

    def key(self, coalition):  # fn cannot be hashed: its name stands for it
        return digest({"method": self.method, "property": self.property,
                       "coalition": sorted(coalition)})

    def depends_on(self, coalition):
        return sorted(coalition)

    def evaluate(self, coalition):
        return float(self.fn(frozenset(coalition)))


class CompositionUtility:
    """U(S) = property of samples of the store's composition restricted to S."""

    method = "composition"

    def __init__(self, store_root: str | Path, property: str, n: int = 256, steps: int = 25,
                 seed: int = 0, scheduler: str = "ddpm", device: str | None = "cpu",
                 aesthetic: dict | None = None):
        self.store = ShardStore.open(store_root)
        self.players = tuple(self.store.contributor_ids)
        if not self.players:
            raise ValueError(f"store {store_root} has no live contributor to value")
        self.property = property
        self.measure = load_property(self.store.root, property, aesthetic)
        self.settings = {"n": n, "steps": steps, "seed": seed, "scheduler": scheduler}
        self.device = device
        self.cache = store_cache(self.store)
        self._sampler = None

    @property
    def sampler(self):
        if self._sampler is None:
            self._sampler = self.store.load_sampler(self.device)
        return self._sampler

    def _model(self, coalition) -> dict:
        """What the composition restricted to S is made of: router and shard hashes
        (for the joint router, {"classifier": hash}, the key of earlier versions)."""
        return {**self.store.router_fingerprint(coalition)["hashes"],
                "shards": {c: self.store.contributor(c)["weights_hash"] for c in sorted(coalition)}}

    def key(self, coalition):
        return digest({"method": self.method, "property": self.measure.key,
                       "settings": self.settings, **self._model(coalition)})

    def depends_on(self, coalition):
        return self.store.router_fingerprint(coalition)["depends_on"]

    def images(self, coalition) -> torch.Tensor:
        """Samples of the composition restricted to `coalition`, from the sample cache
        when another property already needed them."""
        s = self.settings
        if not coalition:
            return prior_images(s["n"], self.store.image_shape, s["seed"])
        key = digest({"samples": self.settings, **self._model(coalition)})
        images = self.cache.get_images(key)
        if images is None:
            images = self.sampler(sorted(coalition), n=s["n"], steps=s["steps"], seed=s["seed"],
                                  scheduler=s["scheduler"]).images
            self.cache.put_images(key, images, self.depends_on(coalition))
        return images

    def evaluate(self, coalition):
        return self.measure(self.images(coalition))
