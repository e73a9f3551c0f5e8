"""Compartmentalized diffusion: one shard per contributor, a router (one density-ratio
head per contributor, or one joint classifier), and the composed sampler. Data flows
data -> shard -> store (registry) -> router -> routing -> shard bank -> sampler.

This package never imports `service` or `valuation`.
"""

from .bank import ShardBank
from .classifier import ShardClassifier, mixture_weights, posterior_weights
from .data import ContributorData, load_contributor, load_contributors
from .errors import CDMError, DataError, StoreError, UnknownContributorError
from .heads import DensityRatioHead, HeadsRouter
from .routing import DEFAULT_ROUTING, Routing
from .sampler import ComposedSampler, SampleOutput
from .shard import StoreConfig
from .store import ShardStore
from .training import TrainConfig

__all__ = [
    "CDMError", "ComposedSampler", "ContributorData", "DEFAULT_ROUTING", "DataError",
    "DensityRatioHead", "HeadsRouter", "Routing", "SampleOutput", "ShardBank",
    "ShardClassifier", "ShardStore", "StoreConfig", "StoreError", "TrainConfig",
    "UnknownContributorError", "load_contributor", "load_contributors", "mixture_weights",
    "posterior_weights",
]
