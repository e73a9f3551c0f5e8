"""The router: what predicts the mixture weights w_i(x_t, t) of the composition
(docs/maths.md eq. 1-2), behind one protocol with two implementations:

    heads   one density-ratio head per contributor, trained on its data and on public
            data owned by nobody (heads.py); forgetting deletes a head, retrains nothing
    joint   one classifier over every contributor (classifier.py); forgetting retrains
            it from scratch on the others' kept data, adding fine-tunes it on replay

`Router` is what the store asks of a router kind while it builds, adds and forgets;
`RouterModel` is what the sampler evaluates: scores s_i(x_t, t[, y]) equal to
log p_t^i(x_t) up to a constant shared by every i, so that the posterior over any
subset S is `routing.posterior_weights(s, log lambda, S)`. No code outside the two
implementations branches on the router's kind: the store asks `registry.router_for`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers import DDPMScheduler

from .data import ContributorData


class RouterModel(Protocol):
    """The router as the sampler evaluates it."""

    contributor_ids: list[str]

    def log_ratios(self, x_t: torch.Tensor, t: torch.Tensor,
                   y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) scores s_i: log p_t^i(x_t [| y]) up to a constant of the row."""

    def to(self, device): ...


class RouterUpdate:
    """A change to the router's shared part, staged by `Router.train` or `extend`:
    `apply(manifest)` writes its files and records them in the manifest about to be
    committed; `finish()` runs after the commit (deletes what it replaced). This one
    changes nothing (router `heads` has no shared part)."""

    def apply(self, manifest: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class Router(Protocol):
    """What the store asks of a router kind. `store` is the registry (registry.py) of
    the store being built, added to or purged; a router writes only its own folders."""

    kind: str
    # what it needs the public data for (an error message names it), None: nothing
    public_use: str | None
    # what a forget retrains ("nothing" or "classifier"), for the audit record
    retrains: str

    def setup(self, root, manifest: dict, public: torch.Tensor | None,
              public_labels: torch.Tensor | None, public_captions: list[str] | None = None) -> None:
        """At store creation, before any contributor: write what the router keeps
        (the public data's captions too, in a text store)."""

    def check_state(self, store) -> None:
        """Raise StoreError if the store cannot take an add now (checked before the
        training and again under the write lock, before the manifest switch)."""

    def check_data(self, store, data: ContributorData) -> None:
        """Raise DataError if the router cannot take `data` (after the store's own
        checks of its shape and labels)."""

    def contributor_part(self, store, data: ContributorData,
                         scheduler: DDPMScheduler, device, progress: bool) -> dict:
        """Train and write the part of the router that belongs to `data`'s contributor
        alone; returns the fields its manifest entry gains."""

    def train(self, store, device, progress: bool) -> RouterUpdate:
        """The shared part from scratch, on the live contributors (at creation, and
        after a forget)."""

    def extend(self, store, data: ContributorData, device,
               progress: bool) -> RouterUpdate:
        """The shared part after `data`'s contributor is added."""

    def derived_paths(self, contributor_id: str, entry: dict) -> list[str]:
        """Store-relative folders of the router derived from that contributor alone
        (`entry`: its manifest entry)."""

    def staging_paths(self, contributor_id: str) -> list[str]:
        """Store-relative folders an interrupted add of that contributor may have left."""

    def describe(self, store) -> str:
        """One line on the router of the store, for people."""

    def audit(self, store, entry: dict | None) -> dict:
        """What a purge's audit record says of the router (before the purge, with the
        excluded `entry`; after it, with None)."""

    def orphans(self, store) -> list[str]:
        """Store-relative folders of the router that the manifest does not name."""

    def fingerprint(self, store, coalition) -> dict:
        """What the router restricted to S is made of (`hashes`), and whose data shaped
        it (`depends_on`): the joint classifier depends on everyone it saw, heads on S
        only."""

    def load(self, store) -> RouterModel:
        """The live router, ready to score (eval mode)."""


class EqualScores(torch.nn.Module):
    """A `RouterModel` that scores every shard alike: the posterior is the priors
    restricted to S; with one shard, weight 1 (sampling one model alone)."""

    def __init__(self, contributor_ids: list[str]):
        super().__init__()
        self.contributor_ids = list(contributor_ids)

    def log_ratios(self, x_t: torch.Tensor, t, y=None) -> torch.Tensor:
        return torch.zeros(x_t.shape[0], len(self.contributor_ids), device=x_t.device)
