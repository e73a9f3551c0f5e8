"""When a sampled estimator stops, and the loop every sampled estimator shares.

A sampled estimator (permutation Shapley, KernelSHAP, Banzhaf MSR) repeats: draw a
batch of coalitions, evaluate them in one `utility.many` call (cached, fanned out),
absorb their values into the estimate; `sample_until` runs that loop with one
stopping rule, one progress bar and one error for a budget too small to sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm


class Utility(Protocol):
    """U(S) as the estimators see it (`valuation.utility.CachedUtility`)."""

    players: tuple[str, ...]
    property: str

    def many(self, coalitions: list[frozenset]) -> list[float]: ...


@dataclass(frozen=True)
class StoppingRule:
    """Stop a sampled estimator at `max_evaluations` distinct coalitions, or earlier
    once at least `min_samples` samples give max_i stderr_i <= `stderr_tol`, or once
    the ranking of the values has not changed over the last `rank_patience` updates
    (0: off). The estimators also stop once every coalition has been seen (then exact
    is cheaper)."""

    max_evaluations: int = 2000
    stderr_tol: float = 0.0
    min_samples: int = 4
    rank_patience: int = 0

    def __post_init__(self):
        if self.max_evaluations < 2 or self.stderr_tol < 0 or self.min_samples < 2 \
                or self.rank_patience < 0:
            raise ValueError(f"bad stopping rule {self}: max_evaluations >= 2, "
                             "stderr_tol >= 0, min_samples >= 2, rank_patience >= 0")

    def done(self, evaluations: int, samples: int, stderr: np.ndarray,
             stable_updates: int = 0) -> bool:
        if evaluations >= self.max_evaluations:
            return True
        if samples < self.min_samples:
            return False
        if self.rank_patience and stable_updates >= self.rank_patience:
            return True
        return self.stderr_tol > 0 and float(np.max(stderr)) <= self.stderr_tol


class RankTracker:
    """How many updates in a row the ranking of the values has stayed the same."""

    def __init__(self):
        self.order: tuple | None = None
        self.stable = 0

    def update(self, values: np.ndarray) -> None:
        order = tuple(np.argsort(-np.asarray(values), kind="stable").tolist())
        self.stable = self.stable + 1 if order == self.order else 0
        self.order = order


@dataclass
class Estimate:
    """Where a sampled estimator stands: the values (None until they are defined),
    their standard errors, how many samples they rest on, the coalitions evaluated."""

    players: list[str]
    values: np.ndarray | None = None
    stderr: np.ndarray = field(default=None)
    samples: int = 0
    seen: set = field(default_factory=set)
    rank_stable: int = 0

    def __post_init__(self):
        if self.stderr is None:
            self.stderr = np.full(len(self.players), np.inf)
        self.seen = {frozenset(), frozenset(self.players)}


def budget_too_small(rule: StoppingRule, n: int) -> str:
    return (f"max_evaluations={rule.max_evaluations} leaves no coalition to sample beyond "
            f"the empty and the full one; allowed: at least 3 (for {n} players, "
            f"{2 ** n} coalitions in all)")


def sample_until(utility: Utility, rule: StoppingRule,
                 draw: Callable[[Estimate], list[frozenset]],
                 absorb: Callable[[list[frozenset], list[float], Estimate], None],
                 desc: str, progress: bool = False) -> Estimate:
    """Draw batches of coalitions (`draw(estimate)`; an empty batch stops), evaluate
    each batch in one call, and let `absorb(coalitions, values, estimate)` update the
    estimate's values, stderr and samples, until `rule` says stop or every coalition
    has been seen. The ranking is tracked whenever the values are defined.

    Raises:
        ValueError: the budget left no coalition to sample (no sample at all).
    """
    estimate = Estimate(list(utility.players))
    n = len(estimate.players)
    ranks = RankTracker()
    bar = tqdm(total=rule.max_evaluations, desc=desc, disable=not progress, leave=False)
    while not rule.done(len(estimate.seen), estimate.samples, estimate.stderr, ranks.stable) \
            and len(estimate.seen) < 2 ** n:
        coalitions = draw(estimate)
        if not coalitions:
            break
        values = utility.many(coalitions)
        bar.update(len(set(coalitions) - estimate.seen))
        estimate.seen.update(coalitions)
        absorb(coalitions, values, estimate)
        if estimate.values is not None:
            ranks.update(estimate.values)
        bar.set_postfix(max_stderr=f"{float(np.max(estimate.stderr)):.3g}")
    bar.close()
    if not estimate.samples:
        raise ValueError(budget_too_small(rule, n))
    estimate.rank_stable = ranks.stable
    return estimate
