"""Compartmentalized diffusion: one shard per contributor, a router (one density-ratio
head per contributor, or one joint classifier), and the composed sampler. Data flows
data -> shard -> registry -> router -> routing -> shard bank -> sampler; the store
builds, adds and forgets (builder.py, forgetting.py).

This package never imports `service` or `valuation`.
"""

from .bank import ShardBank
from .classifier import JointRouter, ShardClassifier, mixture_weights
from .config import StoreConfig
from .data import ContributorData, load_contributor, load_contributors
from .errors import CDMError, DataError, StoreError, UnknownContributorError
from .forgetting import Cleaner, register_cleaner
from .heads import DensityRatioHead, HeadsRouter, StackedHeads
from .router import EqualScores, Router, RouterModel
from .routing import DEFAULT_ROUTING, Routing, posterior_weights
from .sampler import ComposedSampler, SampleOutput, SampleRequest, compose
from .store import ShardStore
from .training import TrainConfig

__all__ = [
    "CDMError", "Cleaner", "ComposedSampler", "ContributorData", "DEFAULT_ROUTING", "DataError",
    "DensityRatioHead", "EqualScores", "HeadsRouter", "JointRouter", "Router", "RouterModel",
    "Routing", "SampleOutput", "SampleRequest", "ShardBank", "ShardClassifier", "ShardStore",
    "StackedHeads", "StoreConfig", "StoreError", "TrainConfig", "UnknownContributorError",
    "compose", "load_contributor", "load_contributors", "mixture_weights", "posterior_weights",
    "register_cleaner",
]
