"""Sparse routing (eq. 4) and the shard bank: routed composition equals dense where it
must, the bank equals each shard alone, and a small cache changes no image."""

import pytest
import torch
from conftest import assert_close

from shards.models import make_unet
from shards.routing import DEFAULT_ROUTING, Routing, draw, route


def test_route_keeps_top_k_or_the_mass_and_renormalises():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.02, 0.01, 0.0]])
    assert_close(route(w, Routing("topk", top_k=1)), torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
    r = route(w, Routing("topk", mass=0.9))  # 0.5+0.3 < 0.9 -> three shards; 0.97 >= 0.9 -> one
    assert_close(r[0], torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    assert_close(r[1], torch.tensor([1.0, 0, 0, 0]))
    both = route(w, Routing("topk", top_k=2, mass=0.9))
    assert_close(both[0], torch.tensor([0.5, 0.3, 0, 0]) / 0.8)
    assert_close(route(w, Routing("topk", mass=1.0)), w, atol=1e-6)
    assert_close(route(w, Routing("topk", top_k=4)), w, atol=1e-6)
    assert torch.equal(route(w, Routing()), w)
    assert (route(w, Routing("topk", top_k=1)) > 0).sum(1).tolist() == [1, 1]


def test_draw_picks_each_shard_with_its_weight_and_never_a_zero_one():
    """The inverse CDF at u: shard i with probability w_i (so E[eps_I] = sum w_i eps_i);
    u = 0 and u just below 1 stay on shards of positive weight."""
    w = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(200_000, -1)
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    picked = draw(w, u)
    assert torch.equal(picked.sum(1), torch.ones(200_000))
    freq = picked.mean(0)
    assert_close(freq, w[0], atol=0.005)
    edge = draw(w[:2], torch.tensor([0.0, 1 - 1e-7]))
    assert edge.argmax(1).tolist() == [1, 4]


def test_draw_above_draws_one_shard_at_high_noise_only():
    w = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    routing = Routing("topk", top_k=2, draw_above=600)
    r = route(w, routing, t=torch.tensor([900, 100]), u=torch.tensor([0.9, 0.9]))
    assert_close(r[0], torch.tensor([0.0, 0.0, 1.0]))  # drawn: 0.9 falls in the third
    assert_close(r[1], torch.tensor([0.5, 0.3, 0.0]) / 0.8)  # top 2, renormalised
    with pytest.raises(ValueError, match="needs each row's timestep"):
        route(w, routing)


def test_drawn_routing_is_reproducible_and_batched_requests_keep_their_images(full_store):
    """The draws come from each request's own generator: the same request gives the
    same images alone and beside another, and about one shard a sample at early steps."""
    from shards.sampler import SampleRequest

    sampler = full_store.load_sampler("cpu")
    routing = Routing("topk", top_k=2, draw_above=0)  # every step but t = 0 draws
    first, second = SampleRequest(None, 3, 1), SampleRequest(("a", "b"), 2, 7)
    alone = sampler.sample_batch([first], steps=6, routing=routing)[0]
    rows = sampler.shard_rows
    together = sampler.sample_batch([second, first], steps=6, routing=routing)[1]
    assert sampler.shard_rows - rows <= 5 * 6 + 5  # one shard a sample but at t = 0 (top 2)
    assert_close(together.images, alone.images, atol=1e-5)
    again = sampler.sample_batch([first], steps=6, routing=routing)[0]
    assert torch.equal(again.images, alone.images)
    other = sampler.sample_batch([SampleRequest(None, 3, 2)], steps=6, routing=routing)[0]
    assert not torch.equal(other.images, alone.images)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "sparse"}, "routing='sparse'; allowed"),
    ({"kind": "topk"}, "needs top_k"),
    ({"kind": "topk", "top_k": 0}, "top_k=0; allowed: an integer >= 1"),
    ({"kind": "topk", "top_k": 1.5}, "top_k=1.5"),
    ({"kind": "topk", "mass": 0.0}, r"mass=0.0; allowed: a number in \(0, 1\]"),
    ({"kind": "topk", "mass": 1.2}, "mass=1.2"),
    ({"kind": "dense", "top_k": 2}, "takes no top_k"),
    ({"kind": "dense", "draw_above": 500}, "takes no top_k, mass or draw_above"),
    ({"kind": "topk", "top_k": 2, "draw_above": -1}, "draw_above=-1; allowed: a timestep >= 0"),
    ({"kind": "topk", "top_k": 2, "draw_above": 0.5}, "draw_above=0.5"),
])
def test_bad_routing_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Routing(**kwargs)


def test_parse_defaults_and_subset_check():
    assert Routing.parse() == DEFAULT_ROUTING and Routing.parse("topk") == DEFAULT_ROUTING
    DEFAULT_ROUTING.check_subset(1)  # the default k is cut to |S|, never an error
    with pytest.raises(ValueError, match="top_k=3 is larger than the 2 contributor"):
        Routing.parse("topk", top_k=3).check_subset(2)


@pytest.mark.parametrize("store_name", ["full_store", "joint_store", "lora_store"])
def test_full_routing_equals_dense(request, store_name):
    sampler = request.getfixturevalue(store_name).load_sampler("cpu")
    dense = sampler(None, n=5, steps=6, seed=3, routing=Routing())
    for routing in (Routing("topk", mass=1.0), Routing("topk", top_k=3)):
        routed = sampler(None, n=5, steps=6, seed=3, routing=routing)
        assert_close(routed.images, dense.images, atol=1e-5)
        assert_close(routed.attribution_mean, dense.attribution_mean, atol=1e-5)


def test_top1_evaluates_one_shard_per_sample_and_keeps_full_attribution(full_store):
    sampler = full_store.load_sampler("cpu")
    out = sampler(None, n=4, steps=5, seed=0, routing=Routing("topk", top_k=1))
    assert sampler.shard_rows == 4 * 5
    dense = full_store.load_sampler("cpu")
    dense(None, n=4, steps=5, seed=0, routing=Routing())
    assert dense.shard_rows == 3 * 4 * 5
    assert_close(out.attribution_mean.sum(1), torch.ones(4))
    assert (out.attribution_last > 0).sum(1).min() >= 2  # attribution is the full w^S


def test_naive_mode_refuses_topk(full_store):
    with pytest.raises(ValueError, match="needs mode 'composed'"):
        full_store.load_sampler("cpu")(None, n=1, steps=1, mode="naive",
                                       routing=Routing("topk", top_k=1))


def test_bank_rows_equal_each_shard_alone():
    from shards.bank import ShardBank

    unets = {f"s{i}": make_unet((1, 8, 8), seed=i).eval() for i in range(5)}
    bank = ShardBank(unets["s0"], lambda c: unets[c].state_dict(), list(unets), capacity=5,
                     solo_rows=4)
    x = torch.randn(23, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 1000, (23,), generator=torch.Generator().manual_seed(2))
    ids = ["s0"] * 6 + [f"s{i % 5}" for i in range(17)]  # s0 runs solo, the rest stacked
    out = bank.evaluate(x, t, ids)
    with torch.no_grad():
        ref = torch.cat([unets[c](x[r:r + 1], t[r:r + 1]).sample for r, c in enumerate(ids)])
    assert_close(out, ref, atol=1e-5)
    with pytest.raises(KeyError, match="zed"):
        bank.evaluate(x[:1], t[:1], ["zed"])


def test_small_cache_changes_no_image_and_counts_hits(full_store):
    big = full_store.load_sampler("cpu")
    small = full_store.load_sampler("cpu", cache_shards=1)
    a = big(None, n=4, steps=4, seed=2, routing=Routing())
    b = small(None, n=4, steps=4, seed=2, routing=Routing())
    assert_close(a.images, b.images, atol=1e-5)
    stats = small.bank.stats()
    assert stats["capacity"] == 1 and stats["resident"] == 1
    assert stats["evictions"] > 0 and stats["misses"] > 3
    assert big.bank.stats()["misses"] == 3 and big.bank.stats()["hit_rate"] > 0.5


def test_cache_size_errors(full_store, monkeypatch):
    with pytest.raises(ValueError, match="capacity=0; it must hold at least 1 shard"):
        full_store.load_sampler("cpu", cache_shards=0)
    monkeypatch.setenv("CDM_SHARD_CACHE", "many")
    with pytest.raises(ValueError, match="CDM_SHARD_CACHE='many'"):
        full_store.load_sampler("cpu")
    monkeypatch.setenv("CDM_SHARD_CACHE", "2")
    assert full_store.load_sampler("cpu").bank.capacity == 2


def test_a_failed_load_leaves_its_slot_free_not_shared():
    """A shard whose load fails (e.g. purged) must not make two shards share a slot."""
    from shards.bank import ShardBank

    unets = {f"s{i}": make_unet((1, 8, 8), seed=i).eval() for i in range(4)}

    def load(cid):
        if cid == "s3":
            raise OSError("gone")
        return unets[cid].state_dict()

    bank = ShardBank(unets["s0"], load, list(unets), capacity=2)
    x, t = torch.randn(1, 1, 8, 8), torch.full((1,), 300)
    bank.evaluate(x, t, ["s0"])
    bank.evaluate(x, t, ["s1"])
    with pytest.raises(OSError):
        bank.evaluate(x, t, ["s3"])
    bank.evaluate(x, t, ["s2"])
    assert len(set(bank.slots.values())) == len(bank.slots)
    with torch.no_grad():
        for cid in list(bank.slots):
            assert_close(bank.evaluate(x, t, [cid]), unets[cid](x, t).sample, atol=1e-5)


def test_parse_from_user_input():
    assert Routing.parse(top_k=2) == Routing("topk", top_k=2)
    drawn = Routing.parse(draw_above=700)
    assert (drawn.top_k, drawn.mass, drawn.draw_above) == (
        DEFAULT_ROUTING.top_k, DEFAULT_ROUTING.mass, 700)
    assert Routing.parse("topk", top_k=2, draw_above=5) == Routing("topk", top_k=2, draw_above=5)
    assert Routing.parse(mode="naive") == Routing()
    with pytest.raises(ValueError, match="routing='topk' needs mode 'composed'"):
        Routing.parse(top_k=2, mode="naive")
