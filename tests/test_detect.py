"""The planted-noise benchmark's arithmetic (benchmarks/detect.py) on closed-form games:
the subset view, AUROC, ranks and the honest-order Spearman."""

import numpy as np
import pytest

from valuation.utility import CachedUtility, GameUtility


@pytest.fixture(scope="module")
def detect():
    import detect  # benchmarks/ is on the tests' path (pyproject.toml, pytest's pythonpath)

    return detect


WEIGHTS = {"a": 3.0, "b": 2.0, "c": 1.0, "bad": -1.0, "meh": 1.5}


def additive(s):
    return sum(WEIGHTS[p] for p in s)


def test_auroc_and_rank_have_the_known_answers(detect):
    values = {"a": 3.0, "b": 2.0, "c": 1.0, "x": 1.5}
    assert detect.auroc(values, ["x"]) == pytest.approx(2 / 3)  # above c, below a and b
    assert detect.rank(values, "x") == 3
    assert detect.auroc({**values, "x": 0.0}, ["x"]) == 1.0
    assert detect.auroc({**values, "x": 9.0}, ["x"]) == 0.0
    assert detect.auroc({**values, "x": 1.0}, ["x"]) == pytest.approx(2.5 / 3)  # a tie: 1/2
    # two planted: 4 of the 6 (honest, planted) pairs have the honest one above
    assert detect.auroc({"a": 3.0, "b": 2.0, "c": 1.0, "x": 0.0, "y": 2.5}, ["x", "y"]) \
        == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        detect.auroc({"x": 1.0}, ["x"])


def test_subset_view_values_the_subgame_and_shares_the_cache(detect):
    u = CachedUtility(GameUtility(sorted(WEIGHTS), additive))
    view = detect.SubsetUtility(u, ["c", "a", "b", "bad"])
    assert view.players == ("a", "b", "bad", "c")
    values = detect.values_of(view)
    for method in ("exact", "banzhaf", "beta-shapley", "loo"):  # additive: phi_i = w_i
        assert values[method] == pytest.approx({p: WEIGHTS[p] for p in view.players})
    assert u.evaluations == 16  # the 2^4 coalitions of the subset, nothing else
    detect.values_of(detect.SubsetUtility(u, ["a", "b", "c"]))
    assert u.evaluations == 16  # a sub-subgame is all cached
    with pytest.raises(ValueError, match="not within"):
        view.many([frozenset({"meh"})])
    with pytest.raises(ValueError, match="not in"):
        detect.SubsetUtility(u, ["a", "zed"])


def test_summary_of_a_known_benchmark(detect):
    """Additive game plus an interaction: 'meh' is worth 1.5 alone but hurts a."""
    def game(s):
        return additive(s) - (4.5 if {"a", "meh"} <= s else 0.0)

    u = CachedUtility(GameUtility(sorted(WEIGHTS), game))
    honest = ("a", "b", "c")
    cases = {"bad": ("bad",), "meh": ("meh",), "bad+meh": ("bad", "meh")}
    vals = {name: {"p": detect.values_of(detect.SubsetUtility(u, (*honest, *pl)))}
            for name, pl in cases.items()}
    honest_game = {"p": detect.values_of(detect.SubsetUtility(u, honest))}
    table = detect.summarise({k: (cases[k], vals[k]) for k in cases}, honest_game, ["p"],
                             list(detect.METHODS))
    exact = table["p/exact"]
    # exact Shapley: the interaction -4.5 splits between a and meh: a 0.75, meh -0.75
    assert exact["cases"]["meh"]["values"]["a"] == pytest.approx(0.75)
    assert exact["cases"]["meh"]["values"]["meh"] == pytest.approx(-0.75)
    assert exact["cases"]["meh"]["ranks"] == {"meh": 4}
    assert exact["cases"]["bad"]["auroc"] == 1.0
    assert exact["cases"]["meh"]["auroc"] == 1.0
    # a drops to the honest's lowest: order (b, c, a) against (a, b, c): Spearman -0.5
    assert exact["cases"]["meh"]["honest_spearman"] == pytest.approx(-0.5)
    assert exact["cases"]["bad"]["honest_spearman"] == pytest.approx(1.0)
    assert exact["mean_auroc"] == pytest.approx(1.0)
    assert exact["lowest_share"] == 1.0
    # leave-one-out in the 'meh' case: a is charged the whole interaction (3 - 4.5)
    loo = table["p/loo"]["cases"]["meh"]
    assert loo["values"]["a"] == pytest.approx(-1.5) and loo["values"]["meh"] == pytest.approx(-3.0)


def test_planted_images_are_seeded_and_in_range(detect, tmp_path):
    from shards.demo import write_demo_data

    write_demo_data(tmp_path / "data")
    for kind in detect.KINDS:
        x = detect.planted_images(kind, tmp_path / "data")
        assert x.shape == (80, 8, 8) and x.min() >= 0 and x.max() <= 1
        assert (x == detect.planted_images(kind, tmp_path / "data")).all()
    assert detect.planted_images("blank", tmp_path / "data").max() < 0.2
    # labels for a class-conditional store: the source digits (alice's, for dup-alice)
    _, y = detect.planted("gauss30", tmp_path / "data")
    assert (np.bincount(y, minlength=10) == detect.PER_DIGIT).all()
    _, y = detect.planted("dup-alice", tmp_path / "data")
    assert set(y.tolist()) <= {0, 1}  # alice holds 0 and 1
