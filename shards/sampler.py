"""Composed sampling: the one place the denoising loop lives.

For a subset S of contributors, at every step (docs/maths.md; routing.py eq. 2):

    (3) eps_S(x_t, t) = sum_{i in S} w_i^S(x_t, t) eps_i(x_t, t)

and a diffusers scheduler turns eps_S into x_{t-1}: DDPM ancestral (Ho et al. 2020
Algorithm 2, the default), DDIM (Song et al. 2021 eq. 12, eta = 0), or a multistep
solver (DPM-Solver++ 2M and its SDE variant, UniPC; batch.py SCHEDULER_SPECS) whose
history of eps_S is kept per request. `naive` mode uses w_i = 1/|S|, the baseline that
mixes vector fields into blends of distributions.

The stochastic samplers are the ones to use: DDPM's fresh noise at every step corrects
errors in the estimated weights and in the shards' own predictions, where the
deterministic ODE solvers (DDIM, DPM-Solver++ 2M, UniPC) accumulate them. On the
default store DDIM drifts mass toward the broad (corrupted) shard: 26% of final-step
attribution against a 7.4% prior, where DDPM gives 9% (docs/evidence.md); on the
studios store every ODE solver more than doubles the FD (docs/performance.md).

Sparse routing (routing.py eq. 4): the router's weights are computed first (cheap);
each sample is then evaluated only on its routed shards, all (sample, shard) pairs of
the step in one `ShardBank` pass, and eps_S ~= sum_{i in R_b} w~_{b,i} eps_i. Dense
routing evaluates every pair of S and is the reference.

Labelled stores (class-conditional shards and router): every sample carries a label y
and, with lambda_i(y) = lambda_i n_i(y) / n_i (n_i(y): contributor i's images of y),

    (3') eps_S(x_t, t, y) = sum_{i in S, n_i(y) > 0} w_i^S(x_t, t, y) eps_i(x_t, t, y),
         w_i^S = softmax over those i of ( r_i(x_t, t, y) + log lambda_i(y) )

so a contributor without label y has weight 0 and is never evaluated. A request that
names no label draws each sample's y from the composition's own label distribution
p_S(y) proportional to sum_{i in S} lambda_i(y) (from a generator of its own, so x_T is
the same as without labels); since p_S(x) = sum_y p_S(y) p_S(x | y), that is the
unconditional composition exactly.

Text-conditional stores (text.py): every sample carries a prompt c (the null text ""
when the request has none), the shards are eps_i(x_t, t, c) and the heads give
p(i | x_t, c) with the global priors (heads.py eq. 5''). With guidance g (classifier-free
guidance, per shard; docs/maths.md eq. 3''):

    (3'') eps_S^g(x_t, t, c) = sum_{i in R_b} w~_i(x_t, t, c) [ eps_i(x_t, t, null)
                                   + g (eps_i(x_t, t, c) - eps_i(x_t, t, null)) ]

g = 1 is the composition of the conditionals exactly; g > 1 evaluates each routed
(sample, shard) pair twice, in the same bank pass.

Per-sample attribution is the trajectory average of the full w^S (not the routed w~)
over the sampling steps and the last step's w^S; each row sums to 1 over S.

Several requests (each its own S, n and seed) can be sampled in one `Batch`
(batch.py, where the step is): every sample carries its own mask and timestep, every
request its own generator, so a request's images do not depend on what it was batched
with or when it joined, up to float rounding (a shard's rows may run in a plain or a
stacked pass depending on the batch; differences ~1e-6).

__all__ re-exports the request and output types of batch.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .bank import ShardBank
from .batch import SCHEDULER_SPECS, Batch, SampleOutput, SampleRequest, label_seed
from .errors import LabelUnavailableError, TextUnavailableError, UnknownContributorError
from .router import EqualScores, RouterModel
from .routing import Routing
from .text import TextBatch

MAX_GUIDANCE = 20.0


def compose(shards: ShardBank | Mapping[str, torch.nn.Module], schedule_config: dict,
            image_shape: tuple[int, int, int], router: RouterModel | None = None,
            priors: dict[str, float] | None = None,
            label_counts: dict[str, dict[int, int]] | None = None,
            num_labels: int = 0, text_encoder=None, decoder=None) -> ComposedSampler:
    """The one way a composed sampler is assembled: from a store's lazy `ShardBank`,
    or from models in memory ({id: UNet}, all of one architecture: a monolith alone,
    a benchmark's shards). Without a `router` every shard scores alike
    (`EqualScores`): with one model that is plain sampling with it, weight 1.
    `priors` default to equal; `text_encoder` (text.TextEncoder) for text-conditional
    shards; `decoder` (latents -> images in [-1, 1]) for shards of a latent space
    (pipeline.py)."""
    if not isinstance(shards, ShardBank):
        states = {cid: model.eval().state_dict() for cid, model in shards.items()}
        template = next(iter(shards.values()))
        shards = ShardBank(template, states.__getitem__, list(states), capacity=len(states))
    if router is None:
        router = EqualScores(shards.contributor_ids)
    priors = priors or {c: 1.0 for c in shards.contributor_ids}
    return ComposedSampler(shards, router, schedule_config, priors, image_shape, label_counts,
                           num_labels, text_encoder, decoder)


class ComposedSampler:
    """Samples from the mixture of shards restricted to any subset of live contributors.

    `router` is a `RouterModel` (router.py): the joint `ShardClassifier`, the
    per-contributor `StackedHeads`, or `EqualScores`; anything with `contributor_ids`
    and `log_ratios(x_t, t) -> (B, K)` scores equal to log p_t^i(x_t) up to a constant
    shared by all i. The joint classifier may have outputs for contributors that are
    no longer live (excluded, purge pending); those outputs are always masked out.
    Assemble one with `compose`.
    """

    def __init__(self, bank: ShardBank, router, schedule_config: dict,
                 priors: dict[str, float], image_shape: tuple[int, int, int],
                 label_counts: dict[str, dict[int, int]] | None = None, num_labels: int = 0,
                 text_encoder=None, decoder=None):
        self.bank = bank
        self.text_encoder, self.decoder = text_encoder, decoder
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
        # labelled: lambda_i(y) = lambda_i n_i(y) / n_i, (K, L); 0 where i lacks y
        self.num_labels = num_labels if label_counts is not None else 0
        self.label_prior = None
        if self.num_labels:
            table = torch.zeros(len(self.classifier_ids), self.num_labels, dtype=torch.float64)
            for k, c in enumerate(self.classifier_ids):
                counts = label_counts.get(c, {})
                total = sum(counts.values())
                for y, count in counts.items():
                    table[k, int(y)] = priors.get(c, 1.0) * count / total
            self.label_prior = table
        self.shard_rows = 0  # (sample, shard) evaluations so far, for cost accounting

    @property
    def device(self) -> torch.device:
        return self.bank.device

    def to(self, device: torch.device | str) -> ComposedSampler:
        """Move the shard cache and the router to `device`; returns self."""
        self.bank.to(device)
        self.router.to(device)
        return self

    def mask(self, contributors) -> torch.Tensor:
        """(K,) bool over classifier outputs for one request's subset."""
        if contributors is None:
            contributors = self.live_ids
        if len(contributors) == 0:
            raise ValueError("contributors is empty: name at least one")
        unknown = sorted({c for c in contributors if c not in self.live_ids})
        if unknown:
            raise UnknownContributorError(unknown)
        return torch.tensor([c in contributors for c in self.classifier_ids])

    def labels_held(self, contributors=None) -> dict[str, list[int]]:
        """The labels each contributor of S (None: every live one) holds."""
        mask = self.mask(contributors)
        if self.label_prior is None:
            return {}
        return {c: torch.nonzero(self.label_prior[k] > 0).flatten().tolist()
                for k, c in enumerate(self.classifier_ids) if mask[k]}

    def check_labels(self, request: SampleRequest) -> None:
        """Raise what `Batch.add` would for the request's labels and prompt (below),
        before any sampling."""
        self.request_text(request)
        if request.labels is not None:
            self.request_labels(request, self.mask(request.contributors))

    def request_text(self, request: SampleRequest) -> tuple[TextBatch, torch.Tensor] | None:
        """(n rows of the request's prompt, or of the null text without one; (n,)
        guidance, 1 without a prompt) in a text store, None in another.

        Raises:
            TextUnavailableError: a prompt in a store without text conditioning, or
                labels in a text store.
            ValueError: a bad prompt (text.TextEncoder.check_prompt) or guidance.
        """
        if self.text_encoder is None:
            if request.prompt is not None:
                raise TextUnavailableError("this store has no text conditioning, so it takes "
                                           "no prompt", self.supports())
            return None
        if request.labels is not None:
            raise TextUnavailableError("this store is text-conditional, so it takes no "
                                       "label", self.supports())
        g = request.guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= MAX_GUIDANCE:
            raise ValueError(f"guidance={g!r}; allowed: a number from 0 to {MAX_GUIDANCE} "
                             "(1: no guidance)")
        if request.prompt is None:  # the unconditional composition: nothing to guide
            return self.text_encoder.null(request.n), torch.ones(request.n, dtype=torch.float64)
        text = self.text_encoder.encode([self.text_encoder.check_prompt(request.prompt)])
        return text.repeat(request.n), torch.full((request.n,), float(g), dtype=torch.float64)

    def supports(self) -> str:
        """What a request may condition on here, for error messages."""
        if self.text_encoder is not None:
            return "prompts (text conditioning)"
        if self.label_prior is not None:
            return f"labels 0..{self.num_labels - 1}"
        return "neither labels nor prompts (it is unconditional)"

    def request_labels(self, request: SampleRequest, mask: torch.Tensor) -> torch.Tensor | None:
        """(n,) labels of a request's samples: given, or drawn from p_S(y).

        Raises:
            ValueError: an empty list of labels.
            LabelUnavailableError: no contributor of S holds a requested label (in an
                unlabelled store, none holds any).
        """
        if self.label_prior is None:
            if request.labels is not None:  # nobody holds any label
                raise LabelUnavailableError(request.labels[0], {}, unlabelled=True)
            return None
        in_s = self.label_prior[mask]  # (|S|, L)
        if request.labels is None:
            p_y = in_s.sum(0)
            g = torch.Generator().manual_seed(label_seed(request.seed))
            return torch.multinomial(p_y.float(), request.n, replacement=True, generator=g)
        labels = list(request.labels)
        if not labels:
            raise ValueError("labels is empty: give one label for all images or one per image")
        for y in sorted(set(labels)):
            if not (0 <= y < self.num_labels) or not bool((in_s[:, y] > 0).any()):
                raise LabelUnavailableError(y, self.labels_held(
                    [c for c, on in zip(self.classifier_ids, mask.tolist(), strict=True) if on]))
        # one for all, one per image, or any list repeated to fill n
        return torch.tensor([labels[i % len(labels)] for i in range(request.n)], dtype=torch.long)

    def __call__(self, contributors: list[str] | None = None, n: int = 16, steps: int = 50,
                 seed: int = 0, scheduler: str = "ddpm", mode: str = "composed",
                 progress: bool = False, routing: Routing | None = None,
                 prompt: str | None = None, guidance: float = 1.0) -> SampleOutput:
        """Draw `n` samples restricted to `contributors` (None = all live ones).

        The initial noise x_T and DDPM's per-step noise come from a CPU generator
        seeded with `seed` and do not depend on S (common random numbers).

        `routing` (default dense) picks the shards each sample is evaluated on
        (routing.py); attribution is the full w^S whatever the routing.

        Raises:
            ValueError: bad n, steps, scheduler, mode or routing; empty contributors.
            UnknownContributorError: a contributor this sampler does not hold.
        """
        request = SampleRequest(None if contributors is None else tuple(contributors), n, seed,
                                prompt=prompt, guidance=guidance)
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
        each step but the last (the number of steps done) and returns the outputs."""
        batch = self.batch(steps, scheduler, mode, routing)
        for i, request in enumerate(requests):
            batch.add(request, handle=i)
        outputs: list[SampleOutput | None] = [None] * len(requests)
        done = 0
        while batch.rows:
            for i, out in batch.step():
                outputs[i] = out
            done += 1
            if batch.rows:
                yield done
        return outputs

    def batch(self, steps: int = 50, scheduler: str = "ddpm", mode: str = "composed",
              routing: Routing | None = None) -> Batch:
        """An empty `Batch`: requests join it at any step and leave when done."""
        return Batch(self, steps, scheduler, mode, routing or Routing())


__all__ = ["SCHEDULER_SPECS", "Batch", "ComposedSampler", "SampleOutput", "SampleRequest",
           "compose", "label_seed"]
