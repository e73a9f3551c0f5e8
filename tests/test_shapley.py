"""Shapley estimators on games with closed-form values, and the axioms."""

import itertools
import math

import numpy as np
import pytest

from valuation.shapley import (
    exact_shapley,
    kernel_matrix,
    kernel_shap,
    leave_one_out,
    permutation_shapley,
)
from valuation.stopping import StoppingRule
from valuation.utility import CachedUtility, GameUtility


def game(players, fn):
    return CachedUtility(GameUtility(players, fn))


def additive(weights):
    return game(list(weights), lambda s: sum(weights[i] for i in s))


def glove():
    """Two left gloves, one right glove: U(S) = number of pairs in S.
    phi_right = 2/3, phi_left = 1/6 each."""
    return game(["l1", "l2", "r"], lambda s: min(len(s & {"l1", "l2"}), len(s & {"r"})))


def voting():
    """Weighted majority [quota 6; 4, 2, 2, 1, 1] plus a dummy 'z' with weight 0;
    phi by Shapley-Shubik, worked out by hand over orderings."""
    weights = {"a": 4, "b": 2, "c": 2, "d": 1, "e": 1, "z": 0}
    return game(list(weights), lambda s: float(sum(weights[i] for i in s) >= 6))


def shapley_by_orderings(players, fn):
    """Independent reference: the average marginal over all n! orderings."""
    phi = dict.fromkeys(players, 0.0)
    orders = list(itertools.permutations(players))
    for order in orders:
        for k, p in enumerate(order):
            before = frozenset(order[:k])
            phi[p] += (fn(before | {p}) - fn(before)) / len(orders)
    return phi


def test_exact_additive_game_returns_the_weights():
    weights = {"a": 1.5, "b": -2.0, "c": 0.25, "d": 7.0}
    r = exact_shapley(additive(weights))
    assert r.values == pytest.approx(list(weights.values()), abs=1e-12)
    assert r.evaluations == 16


def test_exact_glove_game():
    r = exact_shapley(glove())
    assert r["r"] == pytest.approx(2 / 3) and r["l1"] == pytest.approx(1 / 6)


def test_exact_voting_game_matches_orderings_and_dummy_gets_zero():
    u = voting()
    r = exact_shapley(u)
    ref = shapley_by_orderings(u.players, u.source.fn)
    assert r.values == pytest.approx([ref[p] for p in r.players], abs=1e-12)
    assert r["z"] == 0.0  # null player
    assert r["b"] == pytest.approx(r["c"]) and r["d"] == pytest.approx(r["e"])  # symmetry
    assert r["a"] > r["b"] > r["d"] > 0


def test_exact_efficiency_on_a_random_game():
    rng = np.random.default_rng(0)
    players = [f"p{i}" for i in range(8)]
    table = {frozenset(c): float(rng.normal() * 100) for k in range(9)
             for c in itertools.combinations(players, k)}
    r = exact_shapley(game(players, table.__getitem__))
    assert r.efficiency_gap() <= 1e-9
    assert r.u_full - r.u_empty == pytest.approx(np.sum(r.values), rel=1e-9)


@pytest.mark.parametrize("estimator", [permutation_shapley, kernel_shap])
def test_sampled_estimators_are_exact_on_additive_games(estimator):
    weights = {f"p{i}": float(i) - 3.0 for i in range(7)}
    r = estimator(additive(weights), StoppingRule(max_evaluations=60), seed=1)
    assert r.values == pytest.approx(list(weights.values()), abs=1e-9)
    assert r.efficiency_gap() <= 1e-9


@pytest.mark.parametrize("estimator", [permutation_shapley, kernel_shap])
def test_sampled_estimators_converge_on_voting_with_honest_stderr(estimator):
    u = voting()
    exact = exact_shapley(u)
    r = estimator(u, StoppingRule(max_evaluations=64), seed=3)  # all 64 coalitions seen
    assert r.efficiency_gap() <= 1e-9
    assert r.samples >= 8 and np.all(r.stderr[:5] > 0)
    error = np.abs(r.values - exact.values)
    assert np.all(error < 0.2), (r.values, exact.values)
    assert np.all(error <= 4 * r.stderr + 1e-12), (error, r.stderr)  # stderr is honest


def test_stopping_rule_stops_on_stderr_before_the_budget():
    weights = {f"p{i}": 1.0 for i in range(10)}
    table = {}

    def noisy(s):  # nearly additive: tiny interaction so that stderr > 0
        key = frozenset(s)
        table.setdefault(key, sum(weights[i] for i in s) + 1e-3 * math.sin(len(table)))
        return table[key]

    r = permutation_shapley(game(list(weights), noisy), StoppingRule(10_000, 1e-3, 4), seed=0)
    assert r.evaluations < 10_000 and np.max(r.stderr) <= 1e-3


def test_stopping_rule_validates():
    with pytest.raises(ValueError, match="max_evaluations"):
        StoppingRule(max_evaluations=1)


def test_kernel_matrix_matches_enumeration():
    n = 5
    p, a = kernel_matrix(n)
    ref = np.zeros((n, n))
    for k in range(1, n):
        for c in itertools.combinations(range(n), k):
            z = np.zeros(n)
            z[list(c)] = 1
            ref += p[k - 1] / math.comb(n, k) * np.outer(z, z)
    assert a == pytest.approx(ref, abs=1e-12)


def test_leave_one_out_on_glove():
    r = leave_one_out(glove())
    assert r["r"] == 1.0 and r["l1"] == 0.0  # LOO misses the left gloves' joint value


def test_cached_utility_rejects_unknown_players_and_counts():
    u = additive({"a": 1.0, "b": 2.0})
    assert u.many([frozenset(), frozenset({"a"}), frozenset({"a"})]) == [0.0, 1.0, 1.0]
    assert u.evaluations == 2
    with pytest.raises(ValueError, match="not in"):
        u(frozenset({"x"}))


@pytest.mark.parametrize("estimator", [permutation_shapley, kernel_shap])
def test_degenerate_budgets_give_values_or_a_clear_error_never_nan(estimator):
    one = additive({"a": 2.0})
    result = estimator(one, StoppingRule(max_evaluations=2))
    assert result.values.tolist() == [2.0]  # one player: phi = U(N) - U(empty)
    with pytest.raises(ValueError, match="max_evaluations=2 leaves no coalition to sample"):
        estimator(additive({"a": 1.0, "b": 2.0, "c": 3.0}), StoppingRule(max_evaluations=2))
    three = estimator(additive({"a": 1.0, "b": 2.0, "c": 3.0}), StoppingRule(max_evaluations=3))
    assert np.all(np.isfinite(three.values)) and three.values.sum() == pytest.approx(6.0)


def test_game_keys_name_the_game():
    a, b = GameUtility("ab", lambda s: len(s), "size"), GameUtility("ab", lambda s: 2, "two")
    assert a.key(frozenset("a")) != b.key(frozenset("a"))  # a shared cache keeps both apart


def test_banzhaf_and_beta_shapley_on_closed_form_games():
    from valuation.semivalues import semivalue_weights
    from valuation.shapley import exact_semivalue

    u = glove()  # two left gloves, one right
    banzhaf = exact_semivalue(u, semivalue_weights("banzhaf", 3), "banzhaf")
    assert banzhaf["r"] == pytest.approx(0.75) and banzhaf["l1"] == pytest.approx(0.25)
    assert banzhaf.efficiency_gap() > 0  # not efficient, and reported so
    shapley = exact_shapley(u)
    beta11 = exact_semivalue(u, semivalue_weights("beta", 3, 1.0, 1.0), "beta-shapley")
    np.testing.assert_allclose(beta11.values, shapley.values)  # Beta(1, 1) is Shapley
    for n in (2, 5, 9):  # a semivalue's weights are a distribution over coalitions
        for kind, a, b in [("shapley", 1, 1), ("banzhaf", 1, 1), ("beta", 16, 1), ("beta", 2, 5)]:
            p = semivalue_weights(kind, n, a, b)
            assert sum(math.comb(n - 1, k) * p[k] for k in range(n)) == pytest.approx(1.0)
    small = semivalue_weights("beta", 6, 16, 1)
    assert small[0] > small[-1]  # alpha > beta: small coalitions weigh more
    with pytest.raises(ValueError, match="alpha=0"):
        semivalue_weights("beta", 3, 0, 1)
    with pytest.raises(ValueError, match="semivalue='owen'"):
        semivalue_weights("owen", 3)


def test_msr_banzhaf_reuses_every_sample_and_converges():
    from valuation.semivalues import msr_banzhaf, semivalue_weights
    from valuation.shapley import exact_semivalue

    rng = np.random.default_rng(0)
    table = {frozenset(c): float(rng.normal()) for k in range(7)
             for c in itertools.combinations("abcdef", k)}
    u = game("abcdef", lambda s: table[frozenset(s)] + 3 * ("a" in s) - 2 * ("f" in s))
    exact = exact_semivalue(u, semivalue_weights("banzhaf", 6), "banzhaf")
    msr = msr_banzhaf(u, StoppingRule(max_evaluations=64), seed=1, batch=64)
    assert msr.evaluations <= 64
    assert np.corrcoef(msr.values, exact.values)[0, 1] > 0.9
    assert np.all(np.abs(msr.values - exact.values) <= 4 * msr.stderr + 1e-9)


def test_rank_patience_stops_sampling_once_the_ranking_holds():
    u = additive({"a": 5.0, "b": 3.0, "c": 1.0, "d": -2.0, "e": 0.5, "f": 2.0, "g": 4.0})
    full = permutation_shapley(u, StoppingRule(max_evaluations=128))
    early = permutation_shapley(additive({"a": 5.0, "b": 3.0, "c": 1.0, "d": -2.0, "e": 0.5,
                                          "f": 2.0, "g": 4.0}),
                                StoppingRule(max_evaluations=128, rank_patience=2))
    assert early.evaluations < full.evaluations
    assert list(np.argsort(early.values)) == list(np.argsort(full.values))
