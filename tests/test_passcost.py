"""The shard bank's split of a step's rows between calls of their own and the stacked
pass, chosen by measured cost (shards/passcost.py)."""

import pytest
import torch
from conftest import assert_close

from shards import passcost
from shards.bank import SOLO_ROWS, ShardBank
from shards.models import make_unet
from shards.passcost import PassCosts

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def measured(monkeypatch):
    """The split chosen by timing, as in production (conftest fixes it elsewhere)."""
    monkeypatch.delenv("CDM_SOLO_ROWS", raising=False)
    monkeypatch.setattr(passcost, "_MEASURED", {})


def test_the_split_follows_the_costs():
    rows = (1, 4, 16, 64)
    # a call's fixed cost dominates (the digits): one stacked pass for everything
    overhead = PassCosts(rows, plain=(5.0, 5.1, 5.4, 6.6), stacked=(5.0, 5.2, 6.0, 9.2))
    assert overhead.solo({"a": 10, "b": 10, "c": 3}) == set()
    # a stacked row costs twice a plain one, calls are cheap: shards with many rows go solo
    arithmetic = PassCosts(rows, plain=(1.0, 1.3, 2.5, 7.3), stacked=(1.0, 1.6, 4.0, 13.6))
    assert arithmetic.solo({"a": 30, "b": 12, "c": 1}) == {"a", "b"}
    assert arithmetic.solo({"a": 1}) == set()  # one row: no cheaper either way
    assert arithmetic.stacked_s(0) == 0.0
    assert arithmetic.plain_s(128) == pytest.approx(7.3 + (7.3 - 2.5) / 48 * 64)  # extended


def _bank(n_shards=4, **kw):
    unets = {f"s{i}": make_unet((1, 8, 8), seed=i).eval() for i in range(n_shards)}
    return unets, ShardBank(unets["s0"], lambda c: unets[c].state_dict(), list(unets),
                            capacity=n_shards, **kw)


def test_the_bank_times_its_first_pass_and_computes_the_same_rows(monkeypatch):
    monkeypatch.setattr(passcost, "BUDGET_S", 60.0)  # timed even on a loaded machine
    unets, bank = _bank()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(2))
    ids = ["s0"] * 25 + ["s1"] * 10 + ["s2", "s3"] * 2 + ["s1"]
    out = bank.evaluate(x, t, ids)
    costs = bank.stats()["pass_costs"]
    assert costs is not None and len(costs["plain"]) == len(costs["stacked"]) == 4
    assert all(s > 0 for s in costs["plain"] + costs["stacked"])
    with torch.no_grad():
        ref = torch.cat([unets[c](x[r:r + 1], t[r:r + 1]).sample for r, c in enumerate(ids)])
    assert_close(out, ref, atol=1e-5)
    _, again = _bank()  # another bank of the process: the same timings, not timed again
    again.evaluate(x[:2], t[:2], ids[:2])
    assert again.costs is bank.costs
    # whatever the split, the same rows: every shard solo, and none
    for split in (lambda counts: set(counts), lambda counts: set()):
        bank.costs = type("Fixed", (), {"solo": staticmethod(split)})()
        assert_close(bank.evaluate(x, t, ids), ref, atol=1e-5)


def test_a_model_too_slow_to_time_keeps_the_fixed_threshold(monkeypatch):
    monkeypatch.setattr(passcost, "BUDGET_S", 0.0)
    _, bank = _bank(2)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 900])
    bank.evaluate(x, t, ["s0", "s1", "s0"])
    assert bank.stats()["pass_costs"] is None
    assert bank.solo_rows == SOLO_ROWS
    _, fixed = _bank(2, solo_rows=4)  # given: never timed
    fixed.evaluate(x, t, ["s0", "s1", "s0"])
    assert fixed.stats()["pass_costs"] is None


def test_a_store_sampler_splits_by_measured_cost_unless_told(full_store, monkeypatch):
    monkeypatch.setattr(passcost, "BUDGET_S", 60.0)
    sampler = full_store.load_sampler("cpu")
    out = sampler(None, n=6, steps=4, seed=3)
    assert sampler.bank.stats()["pass_costs"] is not None
    monkeypatch.setenv("CDM_SOLO_ROWS", "2")
    fixed = full_store.load_sampler("cpu")
    again = fixed(None, n=6, steps=4, seed=3)
    assert fixed.bank.solo_rows == 2 and fixed.bank.stats()["pass_costs"] is None
    assert_close(again.images, out.images, atol=1e-5)
    monkeypatch.setenv("CDM_SOLO_ROWS", "0")
    with pytest.raises(ValueError, match="CDM_SOLO_ROWS='0'"):
        full_store.load_sampler("cpu")
