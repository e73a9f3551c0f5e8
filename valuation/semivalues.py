"""Semivalues beside Shapley, through the same arithmetic and the same utilities.

A semivalue weighs player i's marginal contributions by coalition size only
(Dubey, Neyman & Weber 1981):

    (1) phi_i = sum_{S subset N \\ {i}} p_{|S|} (U(S u {i}) - U(S)),
        p_k = integral t^k (1 - t)^(n-1-k) dmu(t)   for a probability measure mu on [0, 1]

    Shapley:       mu = Uniform(0, 1)   p_k = k! (n-1-k)! / n!
    Banzhaf:       mu = delta(1/2)      p_k = 1 / 2^(n-1)         (Banzhaf 1965)
    Beta Shapley:  p_k = B(k + beta, n-1-k + alpha) / B(alpha, beta)
                   (Kwon & Zou 2022; alpha > beta weighs small coalitions more:
                   Beta(16, 1) is their choice for finding noisy data; (1, 1) is Shapley)

Only Shapley is efficient (sum_i phi_i = U(N) - U(empty)); the others' efficiency gap
is reported, not forced. Banzhaf is the semivalue whose ranking is most robust to
noise in U (Wang & Jia 2023), and it has a sampler that reuses every evaluation for
every player, maximum sample reuse (MSR):

    (2) S_1..S_m with each player in S_j independently w.p. 1/2;
        phi_i = mean_{j: i in S_j} U(S_j) - mean_{j: i not in S_j} U(S_j),
        stderr_i^2 = var_in / m_in + var_out / m_out.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.special import betaln

from shards.settings import BETA_ALPHA, BETA_BETA

from .result import ValuationResult
from .shapley import ends, exact_semivalue
from .stopping import Estimate, StoppingRule, Utility, sample_until

KINDS = ("shapley", "banzhaf", "beta")


def semivalue_weights(kind: str, n: int, alpha: float = BETA_ALPHA,
                      beta: float = BETA_BETA) -> np.ndarray:
    """p_k of eq. (1) for k = 0..n-1 (the size of the coalition i joins).

    Raises:
        ValueError: unknown kind, n < 1, alpha or beta not positive.
    """
    if kind not in KINDS:
        raise ValueError(f"semivalue={kind!r}; allowed: {list(KINDS)}")
    if n < 1:
        raise ValueError(f"n={n}; allowed: >= 1 player")
    k = np.arange(n)
    if kind == "shapley":
        return np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                         for s in range(n)])
    if kind == "banzhaf":
        return np.full(n, 0.5 ** (n - 1))
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"alpha={alpha}, beta={beta}; allowed: both > 0")
    return np.exp(betaln(k + beta, n - 1 - k + alpha) - betaln(alpha, beta))


def msr_banzhaf(utility: Utility, rule: StoppingRule | None = None, seed: int = 0,
                batch: int = 16, progress: bool = False) -> ValuationResult:
    """Eq. (2): Banzhaf values by maximum sample reuse, with the stopping rule of the
    Shapley samplers (budget of distinct coalitions, stderr, rank stability)."""
    rule = rule or StoppingRule()
    start = time.perf_counter()
    players = list(utility.players)
    n = len(players)
    if n < 2:
        return exact_semivalue(utility, semivalue_weights("banzhaf", n), "banzhaf-msr")
    rng = np.random.default_rng(seed)
    u_full, u_empty = ends(utility)
    member: list[np.ndarray] = []
    value: list[float] = []
    drawn: list[np.ndarray] = []

    def draw(est: Estimate) -> list[frozenset]:
        zs = rng.random((batch, n)) < 0.5
        coalitions = [frozenset(np.asarray(players)[z].tolist()) for z in zs]
        fresh = [c for c in dict.fromkeys(coalitions) if c not in est.seen]
        room = rule.max_evaluations - len(est.seen)
        if len(fresh) > room:  # stay within the budget of distinct coalitions
            keep = set(fresh[:room])
            kept = [j for j, c in enumerate(coalitions) if c in est.seen or c in keep]
            zs, coalitions = zs[kept], [coalitions[j] for j in kept]
        drawn[:] = list(zs)
        return coalitions

    def absorb(_: list[frozenset], values: list[float], est: Estimate) -> None:
        member.extend(drawn)
        value.extend(values)
        est.samples = len(value)
        z, y = np.asarray(member), np.asarray(value)
        m_in, m_out = z.sum(0), (~z).sum(0)
        if np.all(m_in >= 1) and np.all(m_out >= 1):
            mean_in = (z * y[:, None]).sum(0) / m_in
            mean_out = ((~z) * y[:, None]).sum(0) / m_out
            est.values = mean_in - mean_out
            if np.all(m_in >= 2) and np.all(m_out >= 2):
                var_in = ((z * (y[:, None] - mean_in) ** 2).sum(0)) / (m_in - 1)
                var_out = (((~z) * (y[:, None] - mean_out) ** 2).sum(0)) / (m_out - 1)
                est.stderr = np.sqrt(var_in / m_in + var_out / m_out)

    est = sample_until(utility, rule, draw, absorb, "banzhaf msr", progress)
    phi = est.values if est.values is not None else np.zeros(n)
    return ValuationResult("banzhaf-msr", utility.property, players, phi, est.stderr, u_full,
                           u_empty, evaluations=len(est.seen), seconds=time.perf_counter() - start,
                           samples=est.samples, extra={"rank_stable_updates": est.rank_stable})
