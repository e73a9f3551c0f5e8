"""Compartmentalized diffusion: one shard per contributor, a shard classifier, and the
composed sampler. Data flows data -> shard -> store (registry) -> classifier -> sampler.

This package never imports `service` or `valuation`.
"""

from .classifier import ShardClassifier, mixture_weights
from .data import ContributorData, load_contributor, load_contributors
from .errors import CDMError, DataError, StoreError, UnknownContributorError
from .sampler import ComposedSampler, SampleOutput
from .shard import StoreConfig
from .store import ShardStore
from .training import TrainConfig

__all__ = [
    "CDMError", "ComposedSampler", "ContributorData", "DataError", "SampleOutput",
    "ShardClassifier", "ShardStore", "StoreConfig", "StoreError", "TrainConfig",
    "UnknownContributorError", "load_contributor", "load_contributors", "mixture_weights",
]
