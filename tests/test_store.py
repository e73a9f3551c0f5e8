import json

import pytest
import torch
from conftest import assert_close
from diffusers import UNet2DModel
from peft import PeftModel

from shards import ShardStore, load_contributor
from shards.errors import DataError, StoreError, UnknownContributorError


def test_layout_is_config_plus_safetensors_no_pickle(full_store):
    root = full_store.root
    assert (root / "manifest.json").exists()
    for cid in full_store.contributor_ids:
        shard = root / "shards" / cid
        assert (shard / "config.json").exists() and (shard / "shard.json").exists()
        meta = json.loads((shard / "shard.json").read_text())
        assert meta["contributor_id"] == cid and meta["steps"] == 12
        assert set(meta) >= {"data_hash", "seed", "steps", "final_loss"}
    assert not [p for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pickle")]
    # loadable by plain diffusers
    UNet2DModel.from_pretrained(root / "shards" / "a")


def test_round_trip_gives_identical_outputs(full_store):
    s1 = full_store.load_sampler("cpu")
    s2 = ShardStore.open(full_store.root).load_sampler("cpu")
    o1, o2 = s1(["a", "b"], n=3, steps=4, seed=5), s2(["a", "b"], n=3, steps=4, seed=5)
    assert torch.equal(o1.images, o2.images)
    assert torch.equal(o1.attribution_mean, o2.attribution_mean)


def test_training_is_deterministic(tmp_path, datasets, tiny_config, full_store):
    again = ShardStore.create(tmp_path / "again", datasets, tiny_config, device="cpu", progress=False)
    for cid in again.contributor_ids:
        assert again.contributor(cid)["weights_hash"] == full_store.contributor(cid)["weights_hash"]
    assert again.manifest["classifier"]["weights_hash"] == full_store.manifest["classifier"]["weights_hash"]


def test_shard_does_not_depend_on_other_contributors(tmp_path, datasets, tiny_config, full_store):
    alone = ShardStore.create(tmp_path / "alone", datasets[:1], tiny_config, device="cpu", progress=False)
    assert alone.contributor("a")["weights_hash"] == full_store.contributor("a")["weights_hash"]


def test_create_refuses_existing_store_and_leaves_nothing_on_failure(tmp_path, datasets, tiny_config, full_store):
    with pytest.raises(StoreError, match="not empty"):
        ShardStore.create(full_store.root, datasets, tiny_config, progress=False)
    with pytest.raises(DataError, match="needs public data"):
        from dataclasses import replace

        ShardStore.create(tmp_path / "x", datasets, replace(tiny_config, kind="lora"), progress=False)
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".x.partial-*"))


def test_open_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no shard store"):
        ShardStore.open(tmp_path)


def test_add_trains_one_shard_and_updates_classifier(tmp_path, datasets, tiny_config, full_store):
    store = ShardStore.create(tmp_path / "s", datasets[:2], tiny_config, device="cpu", progress=False)
    before = {c: store.contributor(c)["weights_hash"] for c in store.contributor_ids}
    store.add(datasets[2], progress=False)
    reopened = ShardStore.open(store.root)
    assert reopened.contributor_ids == ["a", "b", "c"]
    assert {c: reopened.contributor(c)["weights_hash"] for c in before} == before
    # the new shard equals the one trained in a fresh store (it depends only on its data)
    assert reopened.contributor("c")["weights_hash"] == full_store.contributor("c")["weights_hash"]
    assert reopened.manifest["classifier"]["trained"] == "update"
    assert reopened.load_classifier().config.contributor_ids == ["a", "b", "c"]
    assert len(list((store.root / "classifier").iterdir())) == 1  # old version removed
    out = reopened.load_sampler("cpu")(["c"], n=2, steps=2, seed=0)
    assert out.contributor_ids == ["c"]
    with pytest.raises(DataError, match="already in the store"):
        reopened.add(datasets[2], progress=False)


def test_add_rejects_wrong_shape(tmp_path, full_store):
    import numpy as np
    from conftest import write_pngs

    write_pngs(tmp_path / "big", np.zeros((2, 16, 16), dtype=np.uint8))
    with pytest.raises(DataError, match="expected \\(1, 8, 8\\)"):
        ShardStore.open(full_store.root).add(load_contributor(tmp_path / "big"), progress=False)


def test_unknown_contributor(full_store):
    with pytest.raises(UnknownContributorError, match="zed"):
        full_store.contributor("zed")


def test_lora_store_trains_saves_loads_samples(lora_store):
    root = lora_store.root
    assert (root / "base" / "config.json").exists()
    for cid in lora_store.contributor_ids:
        assert (root / "shards" / cid / "adapter_config.json").exists()
        assert (root / "shards" / cid / "adapter_model.safetensors").exists()
    # loadable by plain peft on the plain diffusers base
    base = UNet2DModel.from_pretrained(root / "base")
    PeftModel.from_pretrained(base, root / "shards" / "b")
    sampler = ShardStore.open(root).load_sampler("cpu")
    out = sampler(["a", "c"], n=3, steps=3, seed=1)
    assert out.images.shape == (3, 1, 8, 8)
    assert_close(out.attribution_mean.sum(1), torch.ones(3))


def test_lora_mixed_batch_equals_one_adapter_at_a_time(lora_store):
    ensemble = lora_store.load_ensemble()
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), 300)
    mixed = ensemble.predict(x, t, ["a", "b", "c"])
    for k, cid in enumerate(["a", "b", "c"]):
        ensemble.lora.set_adapter(cid)
        with torch.no_grad():
            single = ensemble.lora(x, t).sample
        assert_close(mixed[k], single, atol=1e-5)
