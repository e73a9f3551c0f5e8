"""Shapley arithmetic, shared by every way of obtaining U(S) (composition, pruned
fine-tune, retrain, closed-form games). A method here only decides which coalitions
to evaluate and how to combine their utilities; `utility.many(coalitions)` returns
U for a list of frozensets (cached and fanned out by `valuation.utility`).

Shapley value of player i in N, |N| = n (Shapley 1953):

    (1) phi_i = sum_{S subset N \\ {i}} |S|! (n - |S| - 1)! / n! * (U(S u {i}) - U(S))

Efficiency: sum_i phi_i = U(N) - U(empty). Equivalently phi_i is the expected
marginal contribution of i over uniformly random orderings of N:

    (2) phi_i = E_pi [ U(P_i^pi u {i}) - U(P_i^pi) ],  P_i^pi = players before i in pi

KernelSHAP (Lundberg & Lee 2017; Covert & Lee 2021): phi solves

    (3) min_phi E_{z ~ p} [ (U(z) - U(0) - z^T phi)^2 ]  s.t.  1^T phi = U(1) - U(0),
        p(z) proportional to 1 / (|z| (n - |z|))  over 0 < |z| < n, uniform within a size,

    with solution phi = A^-1 (b - 1 (1^T A^-1 b - U(1) + U(0)) / (1^T A^-1 1)),
    A = E[z z^T], b = E[z (U(z) - U(0))].
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
from tqdm.auto import tqdm

from .result import ValuationResult
from .stopping import Estimate, StoppingRule, Utility, sample_until


def ends(utility: Utility) -> tuple[float, float]:
    """(U(N), U(empty)), evaluated together."""
    u_empty, u_full = utility.many([frozenset(), frozenset(utility.players)])
    return u_full, u_empty


def exact_shapley(utility: Utility, progress: bool = False) -> ValuationResult:
    """Eq. (1) over all 2^n coalitions."""
    n = len(utility.players)
    weights = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    return exact_semivalue(utility, weights, "exact", progress)


def exact_semivalue(utility: Utility, weights, method: str,
                    progress: bool = False) -> ValuationResult:
    """sum_{S subset N \\ {i}} weights[|S|] (U(S u {i}) - U(S)) over all 2^n coalitions:
    eq. (1) with Shapley's weights, any semivalue with its own (semivalues.py)."""
    start = time.perf_counter()
    players = list(utility.players)
    n = len(players)
    coalitions = [frozenset(c) for k in range(n + 1) for c in itertools.combinations(players, k)]
    values = dict(zip(coalitions, utility.many(coalitions), strict=True))
    phi = []
    for i in tqdm(players, desc=method, disable=not progress, leave=False):
        terms = [weights[len(s)] * (values[s | {i}] - values[s]) for s in coalitions if i not in s]
        phi.append(math.fsum(terms))
    return ValuationResult(method, utility.property, players, phi, np.zeros(n),
                           values[frozenset(players)], values[frozenset()],
                           evaluations=len(coalitions), seconds=time.perf_counter() - start)


def permutation_shapley(utility: Utility, rule: StoppingRule | None = None,
                        seed: int = 0, batch: int = 4, progress: bool = False) -> ValuationResult:
    """Eq. (2) by Monte Carlo over antithetic pairs (pi, reversed pi): a sample is the
    pair's mean marginal vector; stderr = std over pairs / sqrt(pairs). Each pair's
    marginals sum to U(N) - U(empty), so efficiency holds exactly at every stop."""
    start = time.perf_counter()
    players = list(utility.players)
    n = len(players)
    if n < 2:  # phi = U(N) - U(empty): nothing to sample
        return exact_shapley(utility)
    rng = np.random.default_rng(seed)
    u_full, u_empty = ends(utility)
    samples: list[np.ndarray] = []
    orders: list[list[int]] = []

    def draw(_: Estimate) -> list[frozenset]:
        orders.clear()
        for _ in range(batch):
            order = list(rng.permutation(n))
            orders.extend([order, order[::-1]])
        return [frozenset(players[j] for j in order[:k]) for order in orders
                for k in range(n + 1)]

    def absorb(prefixes: list[frozenset], values: list[float], est: Estimate) -> None:
        value = dict(zip(prefixes, values, strict=True))
        for a in range(0, len(orders), 2):
            pair = np.zeros(n)
            for order in orders[a:a + 2]:
                for k, j in enumerate(order):
                    before = frozenset(players[m] for m in order[:k])
                    pair[j] += 0.5 * (value[before | {players[j]}] - value[before])
            samples.append(pair)
        if len(samples) > 1:
            est.stderr = np.std(samples, axis=0, ddof=1) / np.sqrt(len(samples))
        est.values, est.samples = np.mean(samples, axis=0), len(samples)

    est = sample_until(utility, rule or StoppingRule(), draw, absorb, "permutation shapley",
                       progress)
    return ValuationResult("permutation", utility.property, players, est.values, est.stderr,
                           u_full, u_empty, evaluations=len(est.seen),
                           seconds=time.perf_counter() - start, samples=est.samples)


def kernel_matrix(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The size distribution p(k), k = 1..n-1, of eq. (3) and A = E[z z^T] exactly:
    A_ii = E[|z|] / n, A_ij = E[|z| (|z| - 1)] / (n (n - 1))."""
    k = np.arange(1, n)
    p = 1.0 / (k * (n - k))
    p /= p.sum()
    diag = float(np.sum(p * k / n))
    off = float(np.sum(p * k * (k - 1) / (n * (n - 1))))
    return p, np.full((n, n), off) + np.eye(n) * (diag - off)


def _constrained_ls(zs: np.ndarray, ys: np.ndarray, total: float) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (3) with the sampled A_hat = mean z z^T and b_hat = mean z y (y = U(z) - U(0)):
    phi = M b_hat + c with M = A^-1 - A^-1 1 1^T A^-1 / (1^T A^-1 1), c = A^-1 1 total / (...).
    Returns (phi, M)."""
    n = zs.shape[1]
    a_inv = np.linalg.pinv(zs.T @ zs / len(zs))
    ones = np.ones(n)
    denom = ones @ a_inv @ ones
    m = a_inv - np.outer(a_inv @ ones, ones @ a_inv) / denom
    c = a_inv @ ones * total / denom
    return m @ (zs.T @ ys / len(zs)) + c, m


def kernel_shap(utility: Utility, rule: StoppingRule | None = None, seed: int = 0,
                batch: int = 8, progress: bool = False) -> ValuationResult:
    """Eq. (3) with paired sampling (z and 1 - z), solved on the sampled A_hat, b_hat
    (Lundberg & Lee), which is exact on additive games and efficient by construction.
    Standard errors by the sandwich estimate: phi_hat - phi ~ M mean_j(g_j) with g_j the
    pair's mean of z r (r = regression residual), so Cov(phi) ~ M Cov(g) M^T / pairs."""
    start = time.perf_counter()
    players = list(utility.players)
    n = len(players)
    if n < 2:
        return exact_shapley(utility)
    rng = np.random.default_rng(seed)
    u_full, u_empty = ends(utility)
    p, _ = kernel_matrix(n)
    zs: list[np.ndarray] = []
    ys: list[float] = []

    def draw(_: Estimate) -> list[frozenset]:
        new = []
        for _ in range(batch):
            z = np.zeros(n, dtype=bool)
            z[rng.choice(n, size=rng.choice(np.arange(1, n), p=p), replace=False)] = True
            new += [z, ~z]
        zs.extend(new)
        return [frozenset(np.asarray(players)[z].tolist()) for z in new]

    def absorb(_: list[frozenset], values: list[float], est: Estimate) -> None:
        ys.extend(v - u_empty for v in values)
        z_arr, y_arr = np.asarray(zs, dtype=np.float64), np.asarray(ys)
        phi, m = _constrained_ls(z_arr, y_arr, u_full - u_empty)
        g = z_arr * (y_arr - z_arr @ phi)[:, None]
        g = 0.5 * (g[0::2] + g[1::2])
        if len(g) > 1:
            est.stderr = np.sqrt(np.clip(np.diag(m @ np.cov(g, rowvar=False) @ m.T), 0, None)
                                 / len(g))
        est.values, est.samples = phi, len(zs) // 2

    est = sample_until(utility, rule or StoppingRule(), draw, absorb, "kernel shap", progress)
    return ValuationResult("kernelshap", utility.property, players, est.values, est.stderr,
                           u_full, u_empty, evaluations=len(est.seen),
                           seconds=time.perf_counter() - start, samples=est.samples)


def leave_one_out(utility: Utility) -> ValuationResult:
    """Baseline: phi_i = U(N) - U(N \\ {i}). Not efficient in general."""
    start = time.perf_counter()
    players = list(utility.players)
    full = frozenset(players)
    values = utility.many([frozenset(), full] + [full - {i} for i in players])
    phi = [values[1] - v for v in values[2:]]
    return ValuationResult("loo", utility.property, players, phi, np.zeros(len(players)),
                           values[1], values[0], evaluations=len(values),
                           seconds=time.perf_counter() - start)


def attribution_mass(players: list[str], mass: dict[str, float], u_full: float, u_empty: float,
                     property_name: str, seconds: float = 0.0) -> ValuationResult:
    """Baseline: U(N) - U(empty) split in proportion to each contributor's mean
    attribution (the sampler's mixture weights) over samples of the full composition."""
    share = np.array([mass[c] for c in players], dtype=np.float64)
    share /= share.sum()
    return ValuationResult("attribution", property_name, players, share * (u_full - u_empty),
                           np.zeros(len(players)), u_full, u_empty, evaluations=1,
                           seconds=seconds)
