"""Composed sampling: the one place the denoising loop lives.

For a subset S of contributors, at every step (DESIGN.md, classifier.py eq. 2):

    (3) eps_S(x_t, t) = sum_{i in S} w_i^S(x_t, t) eps_i(x_t, t)

and a diffusers scheduler (DDPM ancestral, Ho et al. 2020 Algorithm 2, the default;
or DDIM, Song et al. 2021 eq. 12 with eta = 0) turns eps_S into x_{t-1}. `naive` mode
uses w_i = 1/|S|, the baseline that mixes vector fields into blends of distributions.

DDPM is the default because its fresh noise at every step corrects errors in the
estimated weights; the deterministic DDIM ODE accumulates them. On the default store
DDIM drifts mass toward the broad (corrupted) shard: 26% of final-step attribution
against a 7.4% prior, where DDPM gives 9% (see README, "Evidence").

Sparse routing (routing.py eq. 4): the router's weights are computed first (cheap);
each sample is then evaluated only on its routed shards, all (sample, shard) pairs of
the step in one `ShardBank` pass, and eps_S ~= sum_{i in R_b} w~_{b,i} eps_i. Dense
routing evaluates every pair of S and is the reference.

Per-sample attribution is the trajectory average of the full w^S (not the routed w~)
over the sampling steps and the last step's w^S; each row sums to 1 over S.

Several requests (each its own S, n and seed) can be sampled in one batch: every
sample carries its own mask, every request its own generator, so a request's images
do not depend on what it was batched with, up to float rounding (a shard's rows may
run in a plain or a stacked pass depending on the batch; differences ~1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from .bank import ShardBank
from .classifier import posterior_weights
from .errors import UnknownContributorError
from .routing import Routing, route

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
MODES = ("composed", "naive")


@dataclass(frozen=True)
class SampleRequest:
    """One request of a batch: `contributors` None means every live contributor."""

    contributors: tuple[str, ...] | None
    n: int
    seed: int


@dataclass
class SampleOutput:
    """Images in [0, 1] (N, C, H, W) and attribution (N, |S|) in `contributor_ids` order."""

    images: torch.Tensor
    contributor_ids: list[str]
    attribution_mean: torch.Tensor
    attribution_last: torch.Tensor

    def attribution_table(self) -> dict[str, dict[str, float]]:
        """Mean over samples of each contributor's per-sample attribution."""
        return {
            cid: {"mean": float(self.attribution_mean[:, i].mean()),
                  "last": float(self.attribution_last[:, i].mean())}
            for i, cid in enumerate(self.contributor_ids)
        }


class ComposedSampler:
    """Samples from the mixture of shards restricted to any subset of live contributors.

    `router` is the joint `ShardClassifier` or the per-contributor `HeadsRouter`:
    anything with `contributor_ids` and `log_ratios(x_t, t) -> (B, K)` scores equal to
    log p_t^i(x_t) up to a constant shared by all i. The joint classifier may have
    outputs for contributors that are no longer live (excluded, purge pending); those
    outputs are always masked out.
    """

    def __init__(self, bank: ShardBank, router, schedule_config: dict,
                 priors: dict[str, float], image_shape: tuple[int, int, int]):
        self.bank = bank
        self.router = router
        self.image_shape = tuple(image_shape)
        self.schedule_config = dict(schedule_config)
        self.classifier_ids = list(router.contributor_ids)
        self.live_ids = bank.contributor_ids
        missing = sorted(set(self.live_ids) - set(self.classifier_ids))
        if missing:
            raise ValueError(f"the router has no output for live shards {missing}")
        self.contributor_ids = [c for c in self.classifier_ids if c in self.live_ids]
        self.log_prior = torch.tensor([float(np.log(priors.get(c, 1.0))) for c in self.classifier_ids])
        self.shard_rows = 0  # (sample, shard) evaluations so far, for cost accounting

    @property
    def device(self) -> torch.device:
        return self.bank.device

    def to(self, device: torch.device | str) -> ComposedSampler:
        """Move the shard cache and the router to `device`; returns self."""
        self.bank.to(device)
        self.router.to(device)
        return self

    def _mask(self, contributors) -> torch.Tensor:
        """(K,) bool over classifier outputs for one request's subset."""
        if contributors is None:
            contributors = self.live_ids
        if len(contributors) == 0:
            raise ValueError("contributors is empty: name at least one")
        unknown = sorted({c for c in contributors if c not in self.live_ids})
        if unknown:
            raise UnknownContributorError(unknown)
        return torch.tensor([c in contributors for c in self.classifier_ids])

    def __call__(self, contributors: list[str] | None = None, n: int = 16, steps: int = 50,
                 seed: int = 0, scheduler: str = "ddpm", mode: str = "composed",
                 progress: bool = False, routing: Routing | None = None) -> SampleOutput:
        """Draw `n` samples restricted to `contributors` (None = all live ones).

        The initial noise x_T and DDPM's per-step noise come from a CPU generator
        seeded with `seed` and do not depend on S (common random numbers).

        `routing` (default dense) picks the shards each sample is evaluated on
        (routing.py); attribution is the full w^S whatever the routing.

        Raises:
            ValueError: bad n, steps, scheduler, mode or routing; empty contributors.
            UnknownContributorError: a contributor this sampler does not hold.
        """
        request = SampleRequest(None if contributors is None else tuple(contributors), n, seed)
        return self.sample_batch([request], steps, scheduler, mode, progress, routing)[0]

    def sample_batch(self, requests: list[SampleRequest], steps: int = 50, scheduler: str = "ddpm",
                     mode: str = "composed", progress: bool = False,
                     routing: Routing | None = None) -> list[SampleOutput]:
        """Sample several requests in one batch; output i equals `self(**requests[i])`
        up to float rounding."""
        stepper = self.iter_batch(requests, steps, scheduler, mode, routing)
        with tqdm(total=steps, desc="sample", disable=not progress, leave=False) as bar:
            while True:
                try:
                    next(stepper)
                except StopIteration as done:
                    return done.value
                bar.update(1)

    def iter_batch(self, requests: list[SampleRequest], steps: int = 50, scheduler: str = "ddpm",
                   mode: str = "composed", routing: Routing | None = None):
        """`sample_batch` one denoising step at a time: a generator that yields after
        each step (the number of steps done) and returns the outputs, so a caller can
        interleave several batches (the service's step scheduler). Arguments are
        checked at the first `next`."""
        caller = torch.is_grad_enabled()
        with torch.no_grad():
            return (yield from self._iter_batch(requests, steps, scheduler, mode, routing, caller))

    def _iter_batch(self, requests, steps, scheduler, mode, routing, caller_grad):
        routing = routing or Routing()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r}; allowed: {sorted(SCHEDULERS)}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
        routing.check_mode(mode)
        if steps < 1 or not requests or any(r.n < 1 for r in requests):
            raise ValueError(f"n and steps must be >= 1, got n={[r.n for r in requests]}, steps={steps}")
        device = self.device
        masks = [self._mask(r.contributors) for r in requests]
        for mask in masks:
            routing.check_subset(int(mask.sum()))
        allowed = torch.cat([m.expand(r.n, -1) for m, r in zip(masks, requests, strict=True)]).to(device)
        chunks = np.cumsum([0] + [r.n for r in requests]).tolist()
        sched = SCHEDULERS[scheduler].from_config(self.schedule_config)
        sched.set_timesteps(steps)
        # 1. x_T ~ N(0, I) from each request's own seed, whatever S is (common random numbers)
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        x = torch.cat([torch.randn((r.n, *self.image_shape), generator=g)
                       for r, g in zip(requests, generators, strict=True)]).to(device)
        batch = x.shape[0]
        log_prior = self.log_prior.to(device)
        alone = bool((allowed.sum(1) == 1).all())  # |S| = 1 everywhere: w = 1, no router needed
        w_sum = torch.zeros(batch, len(self.classifier_ids), device=device)
        for done, t in enumerate(sched.timesteps, 1):
            t_batch = t.to(device).expand(batch)
            # 2. w^S(x_t, t): masked, prior-corrected posterior (eq. 2) or uniform over S
            if mode == "composed" and not alone:
                w = posterior_weights(self.router.log_ratios(x, t_batch), log_prior, allowed)
            else:
                w = allowed.float() / allowed.sum(1, keepdim=True)
            w_sum += w
            # 3. route: each sample keeps its shards R_b, weights renormalised (eq. 4)
            routed = route(w, routing)
            rows, cols = routed.nonzero(as_tuple=True)
            # 4. eps_i(x_t, t) for every routed (sample, shard) pair, in one bank pass
            eps_pairs = self.bank.evaluate(x[rows], t_batch[rows],
                                           [self.classifier_ids[k] for k in cols.tolist()])
            self.shard_rows += len(rows)
            # 5. eps_S = sum_{i in R_b} w~_i eps_i (eq. 3), then x_{t-1} with each request's noise
            eps = torch.zeros_like(x).index_add_(0, rows, eps_pairs * routed[rows, cols][:, None, None, None])
            x = torch.cat([
                sched.step(eps[a:b], t, x[a:b], generator=g if scheduler == "ddpm" else None).prev_sample
                for a, b, g in zip(chunks[:-1], chunks[1:], generators, strict=True)
            ])
            if done < len(sched.timesteps):
                with torch.set_grad_enabled(caller_grad):  # the caller's mode between steps
                    yield done
        images = ((x.clamp(-1, 1) + 1) / 2).cpu()
        w_mean, w_last = (w_sum / len(sched.timesteps)).cpu(), w.cpu()
        outputs = []
        for mask, a, b in zip(masks, chunks[:-1], chunks[1:], strict=True):
            sub = [c for c, m in zip(self.classifier_ids, mask.tolist(), strict=True) if m]
            outputs.append(SampleOutput(images[a:b], sub, w_mean[a:b][:, mask], w_last[a:b][:, mask]))
        return outputs
