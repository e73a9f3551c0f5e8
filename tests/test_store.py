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
        assert meta["precision"] == "fp32"  # what the run computed in (the config: fp32)
    assert not [p for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pickle")]
    # loadable by plain diffusers
    UNet2DModel.from_pretrained(root / "shards" / "a")


def test_round_trip_gives_identical_outputs(full_store):
    s1 = full_store.load_sampler("cpu")
    s2 = ShardStore.open(full_store.root).load_sampler("cpu")
    o1, o2 = s1(["a", "b"], n=3, steps=4, seed=5), s2(["a", "b"], n=3, steps=4, seed=5)
    assert torch.equal(o1.images, o2.images)
    assert torch.equal(o1.attribution_mean, o2.attribution_mean)


def test_training_is_deterministic(tmp_path, datasets, tiny_config, public, full_store, joint_store):
    from conftest import TINY_JOINT

    again = ShardStore.create(tmp_path / "again", datasets, tiny_config, public=public,
                              device="cpu", progress=False)
    for cid in again.contributor_ids:
        for key in ("weights_hash",):
            assert again.contributor(cid)[key] == full_store.contributor(cid)[key]
        assert again.contributor(cid)["head"] == full_store.contributor(cid)["head"]
    joint = ShardStore.create(tmp_path / "joint", datasets, TINY_JOINT, device="cpu", progress=False)
    assert joint.manifest["classifier"]["weights_hash"] == joint_store.manifest["classifier"]["weights_hash"]


def test_shard_and_head_do_not_depend_on_other_contributors(tmp_path, datasets, tiny_config, public,
                                                           full_store):
    alone = ShardStore.create(tmp_path / "alone", datasets[:1], tiny_config, public=public,
                              device="cpu", progress=False)
    assert alone.contributor("a")["weights_hash"] == full_store.contributor("a")["weights_hash"]
    assert alone.contributor("a")["head"]["weights_hash"] == full_store.contributor("a")["head"]["weights_hash"]


def test_heads_store_keeps_no_contributor_data_unless_asked(full_store, joint_store):
    assert not (full_store.root / "data").exists()
    with pytest.raises(StoreError, match="keeps no contributor data"):
        full_store.contributor_images("a")
    assert joint_store.contributor_images("a").shape == (20, 1, 8, 8)
    for cid in full_store.contributor_ids:
        assert (full_store.root / "router" / cid / "config.json").exists()


def test_create_refuses_existing_store_and_leaves_nothing_on_failure(tmp_path, datasets, tiny_config, full_store):

    with pytest.raises(StoreError, match="not empty"):
        ShardStore.create(full_store.root, datasets, tiny_config, progress=False)
    with pytest.raises(DataError, match="router 'heads'.*public data"):
        ShardStore.create(tmp_path / "x", datasets, tiny_config, progress=False)
    with pytest.raises(DataError, match="kind 'lora'.*public data"):
        ShardStore.create(tmp_path / "x", datasets, tiny_config.replace(kind="lora", router="joint"),
                          progress=False)
    with pytest.raises(ValueError, match="router='magic'; allowed"):
        tiny_config.replace(router="magic")
    with pytest.raises(ValueError, match="needs keep_data=True"):
        tiny_config.replace(router="joint", keep_data=False)
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".x.partial-*"))


def test_open_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no shard store"):
        ShardStore.open(tmp_path)


def test_add_with_heads_trains_only_its_own_shard_and_head(tmp_path, datasets, tiny_config, public,
                                                          full_store):
    store = ShardStore.create(tmp_path / "s", datasets[:2], tiny_config, public=public,
                              device="cpu", progress=False)
    before = {c: dict(store.contributor(c)) for c in store.contributor_ids}
    files_before = {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()
                    and p.name != "manifest.json"}
    store.add(datasets[2], progress=False)
    reopened = ShardStore.open(store.root)
    assert reopened.contributor_ids == ["a", "b", "c"]
    assert {c: reopened.contributor(c) for c in before} == before
    for path, mtime in files_before.items():  # nothing of a and b was rewritten
        assert path.stat().st_mtime_ns == mtime, path
    # shard and head equal those trained in a fresh store (they depend only on D_c)
    assert reopened.contributor("c")["weights_hash"] == full_store.contributor("c")["weights_hash"]
    assert reopened.contributor("c")["head"] == full_store.contributor("c")["head"]
    a = reopened.load_sampler("cpu")(None, n=3, steps=3, seed=4)
    b = full_store.load_sampler("cpu")(None, n=3, steps=3, seed=4)
    assert_close(a.images, b.images, atol=1e-6)


def test_add_trains_one_shard_and_updates_classifier(tmp_path, datasets, full_store):
    from conftest import TINY_JOINT

    store = ShardStore.create(tmp_path / "s", datasets[:2], TINY_JOINT, device="cpu", progress=False)
    before = {c: store.contributor(c)["weights_hash"] for c in store.contributor_ids}
    store.add(datasets[2], progress=False)
    reopened = ShardStore.open(store.root)
    assert reopened.contributor_ids == ["a", "b", "c"]
    assert {c: reopened.contributor(c)["weights_hash"] for c in before} == before
    # the new shard equals the one trained in a fresh store (it depends only on its data)
    assert reopened.contributor("c")["weights_hash"] == full_store.contributor("c")["weights_hash"]
    assert reopened.manifest["classifier"]["trained"] == "update"
    assert reopened.load_router().config.contributor_ids == ["a", "b", "c"]
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


@pytest.mark.parametrize("lora", ["adapters", "merged"])
def test_lora_bank_rows_equal_peft_one_adapter_at_a_time(lora_store, lora):
    """The bank evaluates adapters unmerged on one shared base (W x + scale B A x), or
    merged into copies of the base (W + scale B A); either way every row, in the
    stacked pass and in a shard's own call (34 rows), equals peft's adapter."""
    root = lora_store.root
    peft = PeftModel.from_pretrained(UNet2DModel.from_pretrained(root / "base"),
                                     root / "shards" / "a", adapter_name="a")
    for cid in ("b", "c"):
        peft.load_adapter(root / "shards" / cid, adapter_name=cid)
    peft.eval()
    bank = lora_store.load_bank(lora=lora)
    assert (bank.adapters is not None) == (lora == "adapters")
    ids = ["a"] * 34 + ["b", "c", "c", "a", "b"]
    x = torch.randn(len(ids), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.arange(len(ids)) * 20
    mixed = bank.evaluate(x, t, ids)
    for cid in ("a", "b", "c"):
        peft.set_adapter(cid)
        with torch.no_grad():
            single = peft(x, t).sample
        rows = [r for r, c in enumerate(ids) if c == cid]
        assert_close(mixed[rows], single[rows], atol=1e-5)
    if lora == "adapters":  # a resident shard is its adapter, not a copy of the base
        per_slot = sum(layer.a_stack[0].numel() + layer.b_stack[0].numel()
                       for layer in bank.layers.values())
        assert per_slot < 0.5 * sum(p.numel() for p in lora_store.load_base().parameters())


def test_a_store_with_a_full_shard_among_adapters_merges_them(lora_store, tmp_path, data_dir):
    import shutil

    shutil.copytree(lora_store.root, tmp_path / "s")
    store = ShardStore.open(tmp_path / "s")
    store.add(load_contributor(data_dir / "contributors" / "a", "d"), kind="full",
              device="cpu", progress=False)
    assert store.load_bank().adapters is None
    with pytest.raises(ValueError, match="CDM_LORA_BANK='fast'"):
        store.load_bank(lora="fast")


def test_steps_in_proportion_to_images_depend_on_own_data_only(datasets, tiny_config):
    from dataclasses import replace

    from shards.config import StoreConfig
    from shards.models import make_noise_schedule
    from shards.shard import train_shard

    assert tiny_config.steps_reference_images == 154  # the default: in proportion
    fixed = tiny_config.replace(steps_reference_images=None)  # 12 steps whatever the size
    assert fixed.shard_train_for("full", 5) == fixed.shard_train_for("full", 500) == fixed.shard_train
    prop = fixed.replace(steps_reference_images=20, min_shard_steps=3)
    assert prop.shard_train_for("full", 20).steps == 12
    assert prop.shard_train_for("full", 10).steps == 6
    assert prop.shard_train_for("full", 60).steps == 36
    assert prop.shard_train_for("lora", 40).steps == 2 * prop.lora_train.steps
    assert prop.shard_train_for("full", 1).steps == 3  # the floor
    assert prop.replace(min_shard_steps=200).shard_train_for("full", 1).steps == 12  # <= configured
    assert all(prop.shard_train_for("full", n).warmup_steps <= prop.shard_train_for("full", n).steps
               for n in (1, 10, 60))
    assert StoreConfig.from_dict(prop.to_dict()) == prop
    assert StoreConfig.from_dict({k: v for k, v in fixed.to_dict().items()  # stores of before
                                  if k not in ("steps_reference_images", "min_shard_steps")}) == fixed
    with pytest.raises(ValueError, match="steps_reference_images"):
        fixed.replace(steps_reference_images=0)
    half = replace(datasets[0], images=datasets[0].images[:10])
    scheduler = make_noise_schedule(prop.schedule)
    _, meta = train_shard(half, "full", prop, scheduler, progress=False)
    assert meta["steps"] == 6 and meta["images"] == 10


def test_a_lazy_load_checks_the_weights_against_the_registry(store_copy):
    """A sampler made before a shard's files changed (purged, or replaced by other
    weights under the same name) refuses to load them: StoreError, never other
    weights."""
    import shutil

    sampler = store_copy.load_sampler("cpu", cache_shards=1)
    sampler(["a"], n=1, steps=1)  # a is resident; b and c load lazily
    shards = store_copy.root / "shards"
    shutil.copy(shards / "a" / "diffusion_pytorch_model.safetensors",
                shards / "b" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(StoreError, match="'b' was purged or replaced"):
        sampler(["b"], n=1, steps=1)
    shutil.rmtree(shards / "c")
    with pytest.raises(StoreError, match="'c' was purged or replaced"):
        sampler(["c"], n=1, steps=1)
    assert len(sampler(["a"], n=1, steps=1).images) == 1


def test_full_shards_can_start_from_the_public_base(tmp_path, datasets, tiny_config, public):
    """shard_init 'base': every full shard (built or added) starts from the base trained
    on public data only, and forgetting one leaves the base as it was."""
    from shards.training import TrainConfig

    # one step at a tiny learning rate: a shard stays next to where it started
    nudge = TrainConfig(steps=1, batch_size=8, warmup_steps=0, lr=1e-6, ema=False)
    config = tiny_config.replace(shard_init="base", shard_train=nudge.to_dict(),
                                 steps_reference_images=None)
    with pytest.raises(DataError, match="shard_init 'base'.*public data"):
        ShardStore.create(tmp_path / "x", datasets, config.replace(router="joint"), progress=False)
    store = ShardStore.create(tmp_path / "s", datasets[:2], config, public=public,
                              device="cpu", progress=False)
    store.add(datasets[2], progress=False)
    base = UNet2DModel.from_pretrained(store.root / "base").state_dict()
    base_hash = store.manifest["base"]["weights_hash"]
    scratch = ShardStore.create(tmp_path / "scratch", datasets[:1], tiny_config.replace(
        shard_train=nudge.to_dict(), steps_reference_images=None), public=public,
        device="cpu", progress=False)
    far = (scratch.load_shard(datasets[0].contributor_id).state_dict()["conv_in.weight"]
           - base["conv_in.weight"]).abs().max()
    assert far > 1e-2  # a scratch shard is elsewhere
    for cid in store.contributor_ids:
        assert store.contributor(cid)["init"] == "base"
        shard = store.load_shard(cid).state_dict()
        assert (shard["conv_in.weight"] - base["conv_in.weight"]).abs().max() < 1e-4
    store.forget(datasets[0].contributor_id, device="cpu")
    reopened = ShardStore.open(store.root)
    assert reopened.manifest["base"]["weights_hash"] == base_hash
    assert not (store.root / "shards" / datasets[0].contributor_id).exists()


def test_workers_train_the_same_shards_in_parallel_processes(tmp_path, datasets, public, lora_store):
    """`workers=2`: the contributors train in two spawned processes (LoRA shards: the
    base travels through the store being built); the same entries, and weights equal to
    a one-process build up to the float rounding of another thread count."""
    config = lora_store.config
    parallel = ShardStore.create(tmp_path / "parallel", datasets, config, public=public,
                                 device="cpu", progress=False, workers=2)
    assert parallel.contributor_ids == lora_store.contributor_ids
    assert parallel.manifest["base"]["weights_hash"] == lora_store.manifest["base"]["weights_hash"]
    for cid in parallel.contributor_ids:
        mine, ref = parallel.contributor(cid), lora_store.contributor(cid)
        assert {k: v for k, v in mine.items() if k not in ("weights_hash", "head", "added_at", "final_loss")} == \
            {k: v for k, v in ref.items() if k not in ("weights_hash", "head", "added_at", "final_loss")}
        assert mine["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-3)
    a = parallel.load_sampler("cpu")(None, n=4, steps=5, seed=0)
    b = lora_store.load_sampler("cpu")(None, n=4, steps=5, seed=0)
    assert_close(a.images, b.images, atol=1e-3)
    with pytest.raises(ValueError, match="workers=0"):
        ShardStore.create(tmp_path / "bad", datasets, config, public=public, workers=0)


def test_bf16_training_is_recorded_and_close_to_fp32(tmp_path, datasets, public, full_store):
    """`precision: bf16` trains the shards under bfloat16 autocast: recorded in the
    manifest, float32 weights saved, and a loss near the float32 store's."""
    from dataclasses import replace

    from shards.training import TrainConfig

    config = full_store.config
    bf16 = config.replace(shard_train=replace(config.shard_train, precision="bf16").to_dict())
    store = ShardStore.create(tmp_path / "bf16", datasets[:2], bf16, public=public,
                              device="cpu", progress=False)
    assert store.config.shard_train.precision == "bf16"
    assert ShardStore.open(tmp_path / "bf16").manifest["config"]["shard_train"]["precision"] == "bf16"
    for cid in store.contributor_ids:
        assert store.load_shard(cid).dtype == torch.float32
        assert store.contributor(cid)["weights_hash"] != full_store.contributor(cid)["weights_hash"]
        assert store.contributor(cid)["final_loss"] == pytest.approx(
            full_store.contributor(cid)["final_loss"], rel=0.2)
    with pytest.raises(ValueError, match="precision='fp16'; allowed"):
        TrainConfig(precision="fp16")
