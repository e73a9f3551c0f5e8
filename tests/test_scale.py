"""Many contributors: a store split among 40 contributors (tiny training), sampled
through a cache smaller than the store, forgetting and adding one at a time."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY, assert_close

from shards import ShardStore, StoreConfig, load_contributors
from shards.data import ContributorData, load_image_folder
from shards.demo import write_demo_data
from shards.routing import Routing

N = 40


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    table = write_demo_data(root / "data", contributors=N)
    unlabelled = [replace(d, labels=None) for d in load_contributors(root / "data" / "contributors")]
    store = ShardStore.create(root / "store", unlabelled,
                              StoreConfig(shard_train=TINY, head_train=TINY),
                              public=load_image_folder(root / "data" / "public"),
                              device="cpu", progress=False)
    return store, table


def test_the_split_has_n_contributors_and_a_planted_one(many):
    store, table = many
    assert len(store.contributor_ids) == N and "mallory" in store.contributor_ids
    assert table["contributors"]["mallory"]["corrupted"]


def test_a_cache_smaller_than_the_store_serves_the_same_images(many):
    store, _ = many
    full = store.load_sampler("cpu")
    small = store.load_sampler("cpu", cache_shards=4)
    for routing in (Routing("topk", top_k=2), Routing()):
        a = full(None, n=6, steps=3, seed=1, routing=routing)
        b = small(None, n=6, steps=3, seed=1, routing=routing)
        assert_close(a.images, b.images, atol=1e-5)
        assert_close(a.attribution_mean, b.attribution_mean, atol=1e-6)
    stats = small.bank.stats()
    assert stats["resident"] == 4 and stats["evictions"] > 0
    # top-2 evaluates two shards per sample and step, whatever N is
    routed = store.load_sampler("cpu")
    routed(None, n=6, steps=3, seed=1, routing=Routing("topk", top_k=2))
    assert routed.shard_rows == 2 * 6 * 3


def test_forget_and_add_touch_one_contributor(many, tmp_path):
    import shutil

    store, _ = many
    shutil.copytree(store.root, tmp_path / "s")
    copy = ShardStore.open(tmp_path / "s")
    victim = copy.contributor_ids[5]
    snapshot = {p: p.read_bytes() for p in copy.root.rglob("*.safetensors")
                if f"/{victim}/" not in str(p)}
    copy.exclude(victim)
    audit = copy.purge(victim)
    assert audit["retrained"] == "nothing" and len(copy.contributor_ids) == N - 1
    copy.add(ContributorData("newcomer", torch.rand(6, 1, 8, 8) * 2 - 1, "h"), progress=False)
    for path, data in snapshot.items():
        assert path.read_bytes() == data, path
    manifest = json.loads((copy.root / "manifest.json").read_text())
    assert victim not in json.dumps(manifest) and "newcomer" in manifest["contributors"]
    out = copy.load_sampler("cpu", cache_shards=3)(None, n=2, steps=2, seed=0)
    assert victim not in out.contributor_ids and "newcomer" in out.contributor_ids


def test_router_kind_the_store_was_not_built_with(many):
    store, _ = many
    with pytest.raises(Exception, match="built with router 'heads'; allowed: 'heads'"):
        store.load_sampler("cpu", router="joint")
