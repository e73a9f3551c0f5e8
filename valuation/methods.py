"""The valuation methods, by name: how each obtains U(S) (its utility) and how it turns
utilities into values (its estimator). The names are shards/settings.py METHODS.

    method        utility U(S)                           arithmetic
    exact         composition of the shards in S         Shapley over all 2^n coalitions
    permutation   composition                            antithetic permutations
    kernelshap    composition                            paired KernelSHAP
    banzhaf       composition                            Banzhaf over all coalitions
    banzhaf-msr   composition                            Banzhaf by maximum sample reuse
    beta-shapley  composition                            Beta(alpha, beta) semivalue
    pruned        pruned monolith fine-tuned on D_S      exact if n <= max_exact, else KernelSHAP
    retrain       monolith retrained on D_S              exact if n <= max_exact, else KernelSHAP
    loo           composition                            U(N) - U(N \\ i)
    attribution   composition (U(N), U(empty) only)      split by mean sampler attribution

A method differs from another only in where its numbers come from and which
arithmetic combines them (shapley.py, semivalues.py); each returns a ValuationResult.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shards.settings import METHODS as NAMES

from .result import ValuationResult
from .semivalues import msr_banzhaf, semivalue_weights
from .shapley import (
    attribution_mass,
    exact_semivalue,
    exact_shapley,
    kernel_shap,
    leave_one_out,
    permutation_shapley,
)
from .stopping import StoppingRule

# (utility, stopping rule, settings, progress) -> result
Estimator = Callable[..., ValuationResult]


@dataclass(frozen=True)
class Method:
    """A valuation method: the utility it needs ("composition", "pruned" or "retrain")
    and its estimator."""

    name: str
    utility: str
    estimate: Estimator


def _exact_or_kernel(u, rule: StoppingRule, s, progress: bool) -> ValuationResult:
    if len(u.players) <= s.max_exact:
        return exact_shapley(u, progress)
    return kernel_shap(u, rule, s.seed, progress=progress)


def _beta(u, rule, s, progress) -> ValuationResult:
    weights = semivalue_weights("beta", len(u.players), s.alpha, s.beta)
    result = exact_semivalue(u, weights, "beta-shapley", progress)
    result.extra.update(alpha=s.alpha, beta=s.beta)
    return result


def _attribution(u, rule, s, progress) -> ValuationResult:
    u_empty, u_full = u.many([frozenset(), frozenset(u.players)])
    start = time.perf_counter()
    out = u.source.sampler(None, n=s.n, steps=s.steps, seed=s.seed, scheduler=s.scheduler)
    mass = {c: float(out.attribution_mean[:, i].mean()) for i, c in enumerate(out.contributor_ids)}
    return attribution_mass(list(u.players), mass, u_full, u_empty, u.property,
                            seconds=time.perf_counter() - start)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("exact", "composition", lambda u, r, s, p: exact_shapley(u, p)),
    Method("permutation", "composition",
           lambda u, r, s, p: permutation_shapley(u, r, s.seed, progress=p)),
    Method("kernelshap", "composition",
           lambda u, r, s, p: kernel_shap(u, r, s.seed, progress=p)),
    Method("banzhaf", "composition", lambda u, r, s, p: exact_semivalue(
        u, semivalue_weights("banzhaf", len(u.players)), "banzhaf", p)),
    Method("banzhaf-msr", "composition", lambda u, r, s, p: msr_banzhaf(u, r, s.seed, progress=p)),
    Method("beta-shapley", "composition", _beta),
    Method("pruned", "pruned", _exact_or_kernel),
    Method("retrain", "retrain", _exact_or_kernel),
    Method("loo", "composition", lambda u, r, s, p: leave_one_out(u)),
    Method("attribution", "composition", _attribution),
)}
if tuple(METHODS) != NAMES:
    raise RuntimeError("valuation/methods.py and shards/settings.py METHODS disagree")
# the most exact Shapley values of a run are the property's credit (`primary`)
SHAPLEY_PREFERENCE = ("exact", "kernelshap", "permutation", "retrain", "pruned")


def method(name: str) -> Method:
    """The method called `name`.

    Raises:
        ValueError: an unknown name, listing the allowed ones.
    """
    if name not in METHODS:
        raise ValueError(f"method={name!r}; allowed: {list(METHODS)}")
    return METHODS[name]


def primary(results: dict[str, ValuationResult]) -> ValuationResult | None:
    """The most exact Shapley result of a run (what `credit` shows), if any."""
    name = next((m for m in SHAPLEY_PREFERENCE if m in results), None)
    return results[name] if name else None
