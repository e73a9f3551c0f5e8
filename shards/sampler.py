"""Composed sampling: the one place the denoising loop lives.

For a subset S of contributors, at every step (DESIGN.md, classifier.py eq. 2):

    (3) eps_S(x_t, t) = sum_{i in S} w_i^S(x_t, t) eps_i(x_t, t)

and a diffusers scheduler (DDPM ancestral, Ho et al. 2020 Algorithm 2, the default;
or DDIM, Song et al. 2021 eq. 12 with eta = 0) turns eps_S into x_{t-1}.

DDPM is the default because its fresh noise at every step corrects errors in the
estimated weights; the deterministic DDIM ODE accumulates them. On the default store
DDIM drifts mass toward the broad (corrupted) shard: 27% of final-step attribution
against a 7.4% prior, where DDPM gives 7.3% (see README, "Evidence"). `naive` mode uses
w_i = 1/|S|, the baseline that mixes vector fields into blends of distributions.

Per-sample attribution is the trajectory average of w^S over the sampling steps and
the last step's w^S; each row sums to 1 over S.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from .classifier import ShardClassifier, mixture_weights
from .ensemble import ShardEnsemble
from .errors import UnknownContributorError

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
MODES = ("composed", "naive")


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
    """Samples from the mixture of shards restricted to any subset of contributors."""

    def __init__(self, ensemble: ShardEnsemble, classifier: ShardClassifier,
                 schedule_config: dict, priors: dict[str, float],
                 image_shape: tuple[int, int, int]):
        self.ensemble = ensemble
        self.image_shape = tuple(image_shape)
        self.classifier = classifier
        self.schedule_config = dict(schedule_config)
        self.contributor_ids = list(classifier.config.contributor_ids)
        if sorted(self.contributor_ids) != ensemble.contributor_ids:
            raise ValueError(
                f"classifier covers {self.contributor_ids}, shards are {ensemble.contributor_ids}"
            )
        self.log_prior = torch.tensor([float(np.log(priors[c])) for c in self.contributor_ids])

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def _allowed(self, contributors: list[str] | None) -> torch.Tensor:
        if contributors is None:
            return torch.ones(len(self.contributor_ids), dtype=torch.bool)
        if not contributors:
            raise ValueError("contributors is empty: name at least one")
        unknown = [c for c in contributors if c not in self.contributor_ids]
        if unknown:
            raise UnknownContributorError(unknown)
        return torch.tensor([c in contributors for c in self.contributor_ids])

    @torch.no_grad()
    def __call__(self, contributors: list[str] | None = None, n: int = 16, steps: int = 50,
                 seed: int = 0, scheduler: str = "ddpm", mode: str = "composed",
                 progress: bool = False) -> SampleOutput:
        """Draw `n` samples restricted to `contributors` (None = all).

        The initial noise x_T and DDPM's per-step noise come from a CPU generator
        seeded with `seed` and do not depend on S (common random numbers).

        Raises:
            ValueError: bad n, steps, scheduler or mode; empty contributors.
            UnknownContributorError: a contributor this sampler does not hold.
        """
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r}; allowed: {sorted(SCHEDULERS)}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
        if n < 1 or steps < 1:
            raise ValueError(f"n and steps must be >= 1, got n={n}, steps={steps}")
        allowed = self._allowed(contributors)
        ids = [c for c, a in zip(self.contributor_ids, allowed.tolist(), strict=True) if a]
        device = self.device
        sched = SCHEDULERS[scheduler].from_config(self.schedule_config)
        sched.set_timesteps(steps)
        generator = torch.Generator().manual_seed(seed)
        # 1. x_T ~ N(0, I), shared by every subset S for the same seed
        shape = (n, *self.image_shape)
        x = torch.randn(shape, generator=generator).to(device)
        log_prior, log_freq = self.log_prior.to(device), self.classifier.log_train_freq
        w_sum = torch.zeros(n, len(ids), device=device)
        for t in tqdm(sched.timesteps, desc="sample", disable=not progress, leave=False):
            t_batch = t.to(device).expand(n)
            # 2. eps_i(x_t, t) for every i in S, shape (|S|, N, C, H, W)
            eps_all = self.ensemble.predict(x, t_batch, ids)
            # 3. w^S(x_t, t): masked, prior-corrected posterior (eq. 2) or uniform
            if mode == "composed":
                logits = self.classifier(x, t_batch)
                w = mixture_weights(logits, log_prior, log_freq, allowed.to(device))[:, allowed.to(device)]
            else:
                w = torch.full((n, len(ids)), 1.0 / len(ids), device=device)
            w_sum += w
            # 4. eps_S = sum_i w_i eps_i (eq. 3), then the scheduler's x_{t-1}
            eps = torch.einsum("bk,kbchw->bchw", w, eps_all)
            step_noise_gen = generator if scheduler == "ddpm" else None
            x = sched.step(eps, t, x, generator=step_noise_gen).prev_sample
        images = (x.clamp(-1, 1) + 1) / 2
        return SampleOutput(images.cpu(), ids, (w_sum / len(sched.timesteps)).cpu(), w.cpu())
