"""Exact forgetting at the library level: exclusion, purge, and the strongest check,
a store that forgot c generates what a store built without c generates."""

import shutil

import pytest
import torch
from conftest import assert_close

from shards import ShardStore
from shards.errors import StoreError, UnknownContributorError


def test_forgotten_store_equals_store_built_without(store_copy, datasets, tiny_config, tmp_path):
    store_copy.exclude("b")
    audit = store_copy.purge("b")
    never = ShardStore.create(tmp_path / "never", [d for d in datasets if d.contributor_id != "b"],
                              tiny_config, device="cpu", progress=False)
    forgot = ShardStore.open(store_copy.root)
    assert forgot.contributor_ids == never.contributor_ids == ["a", "c"]
    assert forgot.manifest["classifier"]["weights_hash"] == never.manifest["classifier"]["weights_hash"]
    for seed in (0, 1):
        o1 = forgot.load_sampler("cpu")(None, n=4, steps=5, seed=seed)
        o2 = never.load_sampler("cpu")(None, n=4, steps=5, seed=seed)
        assert_close(o1.images, o2.images, atol=1e-6)
        assert_close(o1.attribution_mean, o2.attribution_mean, atol=1e-6)
    assert audit["deleted"] == ["shards/b", "data/b"]
    assert audit["classifier_after"] == never.manifest["classifier"]["weights_hash"]


def test_no_file_or_manifest_entry_of_the_forgotten_remains(store_copy, datasets):
    entry = store_copy.contributor("b")
    store_copy.exclude("b")
    store_copy.purge("b")
    root = store_copy.root
    assert not (root / "shards" / "b").exists() and not (root / "data" / "b").exists()
    manifest = (root / "manifest.json").read_text()
    assert '"b"' not in manifest and entry["data_hash"] not in manifest
    b_images = datasets[1].images
    for path in root.rglob("*.safetensors"):
        from safetensors.torch import load_file

        for tensor in load_file(path).values():
            assert not (tensor.shape == b_images.shape and torch.equal(tensor, b_images)), path
    assert "b" not in ShardStore.open(root).load_classifier().config.contributor_ids


def test_exclusion_is_immediate_and_durable(store_copy):
    sampler_before = store_copy.load_sampler("cpu")
    store_copy.exclude("a")
    reopened = ShardStore.open(store_copy.root)
    assert "a" not in reopened.contributor_ids and reopened.pending_purges == ["a"]
    # a sampler loaded after the exclusion refuses the contributor, even before purge
    sampler = reopened.load_sampler("cpu")
    with pytest.raises(UnknownContributorError, match="a"):
        sampler(["a"], n=1, steps=1)
    out = sampler(None, n=2, steps=2, seed=0)
    assert out.contributor_ids == ["b", "c"]
    # an in-flight sampler snapshot is untouched (no crash), it still holds its shards
    assert sampler_before(["a"], n=1, steps=1).images.shape == (1, 1, 8, 8)
    with pytest.raises(StoreError, match="purge pending"):
        from shards.data import ContributorData

        reopened.add(ContributorData("d", torch.zeros(2, 1, 8, 8), "x"), progress=False)


def test_purge_requires_exclusion_and_is_idempotent_after_crash(store_copy):
    with pytest.raises(StoreError, match="not excluded"):
        store_copy.purge("a")
    store_copy.exclude("a")
    shutil.rmtree(store_copy.root / "shards" / "a")  # a crash after deleting part of it
    ShardStore.open(store_copy.root).purge("a")
    assert ShardStore.open(store_copy.root).pending_purges == []


def test_forgetting_everyone_leaves_an_empty_store(store_copy, datasets):
    for cid in ["a", "b", "c"]:
        store_copy.exclude(cid)
        store_copy.purge(cid)
    store = ShardStore.open(store_copy.root)
    assert store.contributor_ids == [] and store.manifest["classifier"] is None
    with pytest.raises(StoreError, match="no contributors"):
        store.load_sampler("cpu")
    # the store can start again: the classifier is trained from scratch
    store.add(datasets[0], progress=False)
    assert store.manifest["classifier"]["trained"] == "scratch"
    assert store.load_sampler("cpu")(None, n=1, steps=1).contributor_ids == ["a"]


def test_batched_requests_equal_individual_ones(full_store):
    from shards.sampler import SampleRequest

    sampler = full_store.load_sampler("cpu")
    reqs = [SampleRequest(("a",), 2, 7), SampleRequest(None, 3, 1), SampleRequest(("b", "c"), 1, 7)]
    batched = sampler.sample_batch(reqs, steps=4)
    for req, out in zip(reqs, batched, strict=True):
        alone = sampler(None if req.contributors is None else list(req.contributors),
                        n=req.n, steps=4, seed=req.seed)
        assert out.contributor_ids == alone.contributor_ids
        assert_close(out.images, alone.images, atol=1e-5)
        assert_close(out.attribution_mean, alone.attribution_mean, atol=1e-5)
