"""Utilities U(S): a global property of the samples of a model for coalition S.

`CachedUtility` is what the estimators in `shapley.py` call. It wraps a *source*
(how U(S) is obtained: composing the shards in S, fine-tuning a pruned model on D_S,
retraining on D_S, or a closed-form game), remembers what it computed (memo), looks
each coalition up in the disk cache (cache.py), and computes the misses on a back-end
(parallel.py: this process, local workers or Ray).

Common random numbers: every source samples with the same seed for every S, so the
initial noise x_T and the sampler's step noise are the same across coalitions.

U(empty set) is the property of the prior's samples: x_T ~ N(0, I) itself (the same
x_T every coalition starts from), clipped to [-1, 1], i.e. what the sampler returns
with no denoiser. It is the same for every method, so their values are comparable.

Cache: one JSON file per (source key) under STORE/valuation/cache/<method>/, with
`depends_on`, the contributors whose data shaped the number; forgetting c deletes
every entry that depends on c (cache.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from shards import ShardStore

from .cache import UtilityCache, publish_if_live, store_cache
from .parallel import Backend
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


class CachedUtility:
    """U(S) for the estimators: the memo, then the disk cache, then the misses computed
    by `source` on a `Backend` (this process with workers=1, else `workers` spawned
    processes or Ray actors, each rebuilding the source from `spec = (factory,
    kwargs)`).

    `evaluations` counts coalitions computed here, `hits` those read from the cache;
    `seconds[S]` is what computing U(S) cost (now or when it was cached), and
    `touched` the coalitions asked for since the caller last cleared it.
    """

    def __init__(self, source: UtilitySource, cache: UtilityCache | None = None,
                 workers: int = 1, spec: tuple[Callable, dict] | None = None,
                 progress: bool = False, ray_address: str | None = None):
        self.backend = Backend(source, workers, spec, ray_address)
        self.source, self.cache = source, cache
        self.players, self.property = source.players, source.property
        self.progress = progress
        self.evaluations = self.hits = 0
        self.seconds: dict[frozenset, float] = {}
        self.touched: set[frozenset] = set()
        self._memo: dict[frozenset, float] = {}

    def __call__(self, coalition) -> float:
        return self.many([frozenset(coalition)])[0]

    def many(self, coalitions: list[frozenset]) -> list[float]:
        coalitions = [frozenset(c) for c in coalitions]
        self.touched.update(coalitions)
        unknown = set(coalitions) - set(self._memo)
        missing, named = [], {}  # named: each coalition's key and what it depends on,
        # taken before it is computed (a contributor excluded meanwhile has no entry to
        # name it by afterwards)
        for coalition in sorted(unknown, key=lambda c: (len(c), sorted(c))):
            bad = coalition - set(self.players)
            if bad:
                raise ValueError(f"coalition has players {sorted(bad)} not in {list(self.players)}")
            if not self.cache:
                missing.append(coalition)
                continue
            key = self.source.key(coalition)
            entry = self.cache.get(self.source.method, key)
            if entry is None:
                missing.append(coalition)
                named[coalition] = (key, sorted(self.source.depends_on(coalition)))
            else:
                self._memo[coalition] = entry["value"]
                self.seconds[coalition] = entry["seconds"]
                self.hits += 1
        bar = tqdm(total=len(missing), desc=f"U(S) {self.source.method}/{self.property}",
                   disable=not self.progress or not missing, leave=False)
        for coalition, (value, seconds) in zip(missing, self.backend.run(missing), strict=True):
            bar.update()
            self._memo[coalition] = value
            self.evaluations += 1
            self.seconds[coalition] = seconds
            if self.cache:
                key, depends_on = named[coalition]
                entry = {"method": self.source.method, "property": self.property,
                         "coalition": sorted(coalition), "value": value, "seconds": seconds,
                         "depends_on": depends_on, "created_at": time.time()}
                publish_if_live(getattr(self.source, "store", None), depends_on,
                                functools.partial(self.cache.put, self.source.method, key, entry))
        bar.close()
        return [self._memo[c] for c in coalitions]

    def close(self) -> None:
        self.backend.close()


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
        self.cache = store_cache(self.store.root)
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
            return prior_images(s["n"], self.store.pixel_shape, s["seed"])
        key = digest({"samples": self.settings, **self._model(coalition)})
        images = self.cache.get_images(key)
        if images is None:
            images = self.sampler(sorted(coalition), n=s["n"], steps=s["steps"], seed=s["seed"],
                                  scheduler=s["scheduler"]).images
            depends_on = self.depends_on(coalition)
            publish_if_live(self.store, depends_on,
                            lambda: self.cache.put_images(key, images, depends_on))
        return images

    def evaluate(self, coalition):
        return self.measure(self.images(coalition))
