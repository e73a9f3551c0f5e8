"""Continuous batching: several requests sampled together, each at its own step.

One `Batch.step` is one denoising step of every request in it (docs/maths.md eq. 2-4;
sampler.py states the composition): the router's weights w^S of every row (masked to
its request's S and, in a labelled store, its label's holders), the routed shards of
every row in one `ShardBank` pass, eps_S, then each request's scheduler step with its
own noise generator. Requests join between any two steps and leave at their last one
(or when removed: a client that left), so a request's images do not depend on what it
was batched with or when it joined, up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)

from .routing import Routing, posterior_weights, route
from .settings import MODES
from .text import TextBatch


@dataclass(frozen=True)
class SolverSpec:
    """A sampling scheduler: its diffusers class and settings over the store's noise
    schedule; `stochastic` steps draw noise from the request's generator; `multistep`
    ones keep a history of past eps, so every request needs an instance of its own."""

    cls: type
    options: tuple = ()
    stochastic: bool = False
    multistep: bool = False

    def make(self, schedule_config: dict, steps: int):
        sched = self.cls.from_config(schedule_config, **dict(self.options))
        sched.set_timesteps(steps)
        return sched


# The names of shards.settings.SCHEDULERS. DDPM (ancestral) is the default; the
# multistep solvers (DPM-Solver++ 2M, Lu et al. 2022; its SDE variant; UniPC, Zhao et
# al. 2023) reach 50-step DDPM's quality in fewer steps (docs/performance.md).
SCHEDULER_SPECS = {
    "ddpm": SolverSpec(DDPMScheduler, stochastic=True),
    "ddim": SolverSpec(DDIMScheduler),
    "dpmpp-2m": SolverSpec(DPMSolverMultistepScheduler, (("algorithm_type", "dpmsolver++"),),
                           multistep=True),
    "dpmpp-2m-sde": SolverSpec(DPMSolverMultistepScheduler,
                               (("algorithm_type", "sde-dpmsolver++"),), stochastic=True,
                               multistep=True),
    "unipc": SolverSpec(UniPCMultistepScheduler, multistep=True),
}


@dataclass(frozen=True)
class SampleRequest:
    """One request of a batch: `contributors` None means every live contributor;
    `labels` (labelled stores) one for all n samples, one per sample (a shorter list
    repeats to fill n), None to draw them from p_S(y); `steps` its number of denoising
    steps, None for its batch's; `prompt` and `guidance` (text stores) its text and
    classifier-free guidance."""

    contributors: tuple[str, ...] | None
    n: int
    seed: int
    labels: tuple[int, ...] | None = None
    steps: int | None = None
    prompt: str | None = None  # text stores: None samples without a prompt (null text)
    guidance: float = 1.0  # text stores: classifier-free guidance per shard (1: none)


def label_seed(seed: int) -> int:
    """The seed of the generator that draws a request's labels when it names none."""
    return (seed * 0x9E3779B1 + 0x7F4A7C15) % (1 << 63)


def route_seed(seed: int) -> int:
    """The seed of the generator that draws a request's shards (routing draw_above)."""
    return (seed * 0x85EBCA6B + 0x27D4EB2F) % (1 << 63)


@dataclass
class SampleOutput:
    """Images in [0, 1] (N, C, H, W), attribution (N, |S|) in `contributor_ids` order,
    and each sample's label (N,) in a labelled store."""

    images: torch.Tensor
    contributor_ids: list[str]
    attribution_mean: torch.Tensor
    attribution_last: torch.Tensor
    labels: torch.Tensor | None = None

    def attribution_table(self) -> dict[str, dict[str, float]]:
        """Mean over samples of each contributor's per-sample attribution."""
        return {
            cid: {"mean": float(self.attribution_mean[:, i].mean()),
                  "last": float(self.attribution_last[:, i].mean())}
            for i, cid in enumerate(self.contributor_ids)
        }



@dataclass
class _Member:
    request: SampleRequest
    handle: object
    mask: torch.Tensor  # (K,) over router outputs
    generator: torch.Generator
    steps: int  # its own number of steps
    sched: object  # the diffusers scheduler set to `steps` (its own if multistep)
    router_generator: torch.Generator  # draws its shards (routing draw_above)
    done: int = 0  # steps taken


class Batch:
    """Requests sampled together, each at its own step (continuous batching).

    Every request shares (scheduler, mode, routing) but may join between any two
    steps and have its own number of steps (`SampleRequest.steps`; `steps` is the
    default): one step evaluates the router and the routed shards on every row of
    every request at once, each row at its own request's timestep, then each
    request's scheduler step runs with its own noise generator and schedule. A
    request's images do not depend on when it joined or with whom it ran, up to float
    rounding.
    """

    def __init__(self, sampler, steps: int, scheduler: str, mode: str, routing: Routing):
        """`sampler`: the ComposedSampler (sampler.py) whose shards and router it uses."""
        if scheduler not in SCHEDULER_SPECS:
            raise ValueError(f"scheduler={scheduler!r}; allowed: {list(SCHEDULER_SPECS)}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
        routing.check_mode(mode)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.sampler, self.steps, self.scheduler, self.mode, self.routing = (
            sampler, steps, scheduler, mode, routing)
        self.spec = SCHEDULER_SPECS[scheduler]
        self._scheds: dict[int, object] = {}  # steps -> scheduler, when stateless (DDPM, DDIM)
        device, k = sampler.device, len(sampler.classifier_ids)
        self.members: list[_Member] = []
        self.x = torch.zeros((0, *sampler.image_shape), device=device)
        self.allowed = torch.zeros((0, k), dtype=torch.bool, device=device)
        self.log_prior = torch.zeros((0, k), device=device)  # log lambda_i (of y_b) per row
        self.labels = torch.zeros(0, dtype=torch.long, device=device) if sampler.num_labels else None
        self.text = self.guidance = None  # text stores: each row's TextBatch and guidance
        if sampler.text_encoder is not None:
            self.text = sampler.text_encoder.null(1)[:0].to(device)
            self.guidance = torch.zeros(0, dtype=torch.float64, device=device)
        self.w_sum = torch.zeros((0, k), device=device)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def remaining(self) -> int:
        """Rows x steps still to run."""
        return sum(m.request.n * (m.steps - m.done) for m in self.members)

    def _sched(self, steps: int):
        if self.spec.multistep:  # a history of its own request's eps
            return self.spec.make(self.sampler.schedule_config, steps)
        if steps not in self._scheds:
            self._scheds[steps] = self.spec.make(self.sampler.schedule_config, steps)
        return self._scheds[steps]

    def add(self, request: SampleRequest, handle: object = None) -> None:
        """Join: x_T from the request's own seed (common random numbers, whatever S).

        Raises:
            ValueError: n < 1, steps < 1, empty contributors, top_k above |S|.
            UnknownContributorError: a contributor the sampler does not hold.
        """
        if request.n < 1:
            raise ValueError(f"n must be >= 1, got {request.n}")
        steps = self.steps if request.steps is None else request.steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        sched = self._sched(steps)
        s = self.sampler
        mask = s.mask(request.contributors)
        self.routing.check_subset(int(mask.sum()))
        text = s.request_text(request)
        labels = s.request_labels(request, mask)
        generator = torch.Generator().manual_seed(request.seed)
        x = torch.randn((request.n, *s.image_shape), generator=generator)
        device = self.x.device
        allowed = mask.expand(request.n, -1)
        log_prior = s.log_prior.expand(request.n, -1)
        if labels is not None:  # eq. 3': only S's holders of y_b, with log lambda_i(y_b)
            prior_y = s.label_prior[:, labels].T  # (n, K)
            allowed = allowed & (prior_y > 0)
            log_prior = prior_y.clamp_min(1e-300).log().float()
        grown = (torch.cat([self.x, x.to(device)]),
                 torch.cat([self.allowed, allowed.to(device)]),
                 torch.cat([self.log_prior, log_prior.to(device)]),
                 None if labels is None else torch.cat([self.labels, labels.to(device)]),
                 torch.cat([self.w_sum, torch.zeros(request.n, self.w_sum.shape[1], device=device)]))
        if text is not None:
            grown += (TextBatch.cat([self.text, text[0].to(device)]),
                      torch.cat([self.guidance, text[1].to(device)]))
        # all or nothing: a failure above changes none
        self.x, self.allowed, self.log_prior, self.labels, self.w_sum = grown[:5]
        if text is not None:
            self.text, self.guidance = grown[5:]
        self.members.append(_Member(request, handle, mask, generator, steps, sched,
                                    torch.Generator().manual_seed(route_seed(request.seed))))

    @torch.no_grad()
    def step(self) -> list[tuple[object, SampleOutput]]:
        """One denoising step of every request; returns (handle, output) of those that
        took their last step (and leave the batch)."""
        s, x, device = self.sampler, self.x, self.x.device
        t_member = [m.sched.timesteps[m.done] for m in self.members]
        t_rows = torch.cat([t.reshape(1).expand(m.request.n)
                            for t, m in zip(t_member, self.members, strict=True)]).to(device)
        alone = bool((self.allowed.sum(1) == 1).all())  # |S| = 1 everywhere: w = 1, no router
        # 2. w^S(x_t, t): masked, prior-corrected posterior (eq. 2) or uniform over S
        y = self.labels if self.text is None else self.text.pooled
        if self.mode == "composed" and not alone:
            scores = s.router.log_ratios(x, t_rows) if y is None else s.router.log_ratios(x, t_rows, y)
            w = posterior_weights(scores, self.log_prior, self.allowed)
        else:
            w = self.allowed.float() / self.allowed.sum(1, keepdim=True)
        self.w_sum += w
        # 3. route: each sample keeps its shards R_b, weights renormalised (eq. 4)
        u = None
        if self.routing.draw_above is not None:  # n uniforms a request and step, always
            u = torch.cat([torch.rand(m.request.n, generator=m.router_generator)
                           for m in self.members]).to(device)
        routed = route(w, self.routing, t_rows, u)
        rows, cols = routed.nonzero(as_tuple=True)
        # 4. eps_i(x_t, t) for every routed (sample, shard) pair, in one bank pass
        ids = [s.classifier_ids[k] for k in cols.tolist()]
        if self.text is None:
            eps_pairs = s.bank.evaluate(x[rows], t_rows[rows], ids, None if y is None else y[rows])
        else:
            eps_pairs = self._guided(x, t_rows, rows, cols, ids)
        s.shard_rows += len(rows)
        # 5. eps_S = sum_{i in R_b} w~_i eps_i (eq. 3), then x_{t-1} with each request's noise
        eps = torch.zeros_like(x).index_add_(0, rows, eps_pairs * routed[rows, cols][:, None, None, None])
        bounds = np.cumsum([0] + [m.request.n for m in self.members]).tolist()
        noisy = self.spec.stochastic
        self.x = torch.cat([
            m.sched.step(eps[a:b], t, x[a:b], **({"generator": m.generator} if noisy else {})).prev_sample
            for a, b, t, m in zip(bounds[:-1], bounds[1:], t_member, self.members, strict=True)])
        finished, keep = [], torch.ones(self.rows, dtype=torch.bool)
        y = self.labels
        for a, b, m in zip(bounds[:-1], bounds[1:], self.members, strict=True):
            m.done += 1
            if m.done == m.steps:
                x0 = self.x[a:b] if s.decoder is None else s.decoder(self.x[a:b])
                images = ((x0.clamp(-1, 1) + 1) / 2).cpu()
                sub = [c for c, on in zip(s.classifier_ids, m.mask.tolist(), strict=True) if on]
                w_mean = (self.w_sum[a:b] / m.steps).cpu()[:, m.mask]
                finished.append((m.handle, SampleOutput(images, sub, w_mean, w[a:b].cpu()[:, m.mask],
                                                        None if y is None else y[a:b].cpu())))
                keep[a:b] = False
        if finished:
            self._keep(keep, [m for m in self.members if m.done < m.steps])
        return finished

    def _guided(self, x, t_rows, rows, cols, ids) -> torch.Tensor:
        """eps of every routed (sample, shard) pair given its sample's text, guided
        (eq. 3''): pairs of rows with guidance g != 1 are evaluated on the null text
        too, in the same bank pass."""
        s, g = self.sampler, self.guidance[rows]
        guided = torch.nonzero(g != 1).flatten()
        text = self.text[rows]
        if len(guided) == 0:
            return s.bank.evaluate(x[rows], t_rows[rows], ids, text=text)
        s.shard_rows += len(guided)  # the unconditional evaluations
        null = s.text_encoder.null(len(guided)).to(x.device)
        both = torch.cat([rows, rows[guided]])
        eps = s.bank.evaluate(x[both], t_rows[both], ids + [ids[i] for i in guided.tolist()],
                              text=TextBatch.cat([text, null]))
        cond, uncond = eps[:len(rows)], eps[len(rows):]
        g_pairs = g[guided].to(cond.dtype)[:, None, None, None]
        cond[guided] = uncond + g_pairs * (cond[guided] - uncond)
        return cond

    def remove(self, handle: object) -> bool:
        """Drop the request of `handle` between two steps (its client left); the
        others go on unchanged. Returns whether it was in the batch."""
        keep, stay, start = torch.ones(self.rows, dtype=torch.bool), [], 0
        for m in self.members:
            if m.handle is handle:
                keep[start:start + m.request.n] = False
            else:
                stay.append(m)
            start += m.request.n
        if len(stay) == len(self.members):
            return False
        self._keep(keep, stay)
        return True

    def _keep(self, keep: torch.Tensor, members: list[_Member]) -> None:
        """Only the rows `keep` marks (and `members`, whose rows they are) go on."""
        keep_dev = keep.to(self.x.device)
        self.members = members
        self.x, self.allowed, self.w_sum = self.x[keep_dev], self.allowed[keep_dev], self.w_sum[keep_dev]
        self.log_prior = self.log_prior[keep_dev]
        if self.labels is not None:
            self.labels = self.labels[keep_dev]
        if self.text is not None:
            self.text, self.guidance = self.text[keep_dev], self.guidance[keep_dev]
