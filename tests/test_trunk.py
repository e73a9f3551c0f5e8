"""The heads' shared trunk (shards/trunk.py): public principal directions, owned by
nobody, so a store with a trunk forgets as locally and exactly as one without."""

import pytest
import torch
from conftest import TINY_CONFIG, assert_close

from shards import ShardStore, StoreConfig
from shards.heads import DensityRatioHead, StackedHeads
from shards.trunk import PublicTrunk, feature_dim, pooled, wanted

F = 16


@pytest.fixture(scope="module")
def trunk_store(tmp_path_factory, datasets, public):
    return ShardStore.create(tmp_path_factory.mktemp("s") / "trunk", datasets,
                             TINY_CONFIG.replace(head_trunk=F), public=public, device="cpu",
                             progress=False)


def test_the_trunk_keeps_more_public_signal_than_any_other_subspace_tried(public):
    trunk = PublicTrunk.fit(public, F)
    u = trunk.components.double()
    assert u.shape == (F, feature_dim(public.shape[1:]))
    assert_close(u @ u.T, torch.eye(F, dtype=torch.float64), atol=1e-5)
    x = pooled(public).double()
    kept = (x @ u.T).pow(2).sum()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # random orthonormal subspaces of the same dimension
        q, _ = torch.linalg.qr(torch.randn(x.shape[1], F, generator=generator, dtype=torch.float64))
        assert kept > (x @ q).pow(2).sum()
    assert kept > x[:, :F].pow(2).sum()  # and the first F pixels
    # signed so that each direction's largest entry is positive: one trunk on any machine
    assert (u.gather(1, u.abs().argmax(1, keepdim=True)) > 0).all()
    assert_close(PublicTrunk.fit(public.flip(0), F).components, trunk.components, atol=1e-5)


def test_a_trunk_that_saves_nothing_or_lacks_images_is_refused(public):
    d = feature_dim(public.shape[1:])
    assert not wanted(tuple(public.shape[1:]), d) and not wanted(tuple(public.shape[1:]), 0)
    with pytest.raises(ValueError, match="saves nothing"):
        PublicTrunk.fit(public, d)
    with pytest.raises(ValueError, match="at least as many"):
        PublicTrunk.fit(public[:F - 1], F)
    with pytest.raises(ValueError, match="head_trunk"):
        StoreConfig(head_trunk=-1)


def test_heads_read_the_trunk_and_stack_exactly(trunk_store):
    trunk_info = trunk_store.manifest["reference"]["trunk"]
    assert trunk_info["features"] == F
    heads = [DensityRatioHead.from_pretrained(trunk_store.root / trunk_store.contributor(c)["head"]["path"])
             for c in trunk_store.contributor_ids]
    assert all(h.config.in_features == F for h in heads)
    trunk = trunk_store.router.trunk(trunk_store)
    stacked = StackedHeads(heads, trunk)
    x = torch.randn(5, 1, 8, 8)
    t = torch.tensor([10, 200, 400, 600, 900])
    with torch.no_grad():
        each = torch.stack([h(trunk(x), t) for h in heads], 1)
        assert_close(stacked(x, t), each, atol=1e-5)
        assert_close(trunk_store.router.load(trunk_store)(x, t), each, atol=1e-5)


def test_a_store_with_a_trunk_forgets_exactly(trunk_store, datasets, public, tmp_path):
    import shutil

    shutil.copytree(trunk_store.root, tmp_path / "store")
    store = ShardStore.open(tmp_path / "store")
    trunk_file = (store.root / "reference" / "trunk" / PublicTrunk.FILE).read_bytes()
    fingerprint = store.router.fingerprint(store, {"a", "c"})
    store.exclude("b")
    audit = store.purge("b")
    assert audit["deleted"] == ["shards/b", "router/b"] and audit["retrained"] == "nothing"
    forgot = ShardStore.open(store.root)
    assert (forgot.root / "reference" / "trunk" / PublicTrunk.FILE).read_bytes() == trunk_file
    assert forgot.router.fingerprint(forgot, {"a", "c"}) == fingerprint
    assert "trunk" in fingerprint["hashes"]
    never = ShardStore.create(tmp_path / "never", [d for d in datasets if d.contributor_id != "b"],
                              store.config, public=public, device="cpu", progress=False)
    assert never.manifest["reference"]["trunk"] == forgot.manifest["reference"]["trunk"]
    for seed in (0, 1):
        o1 = forgot.load_sampler("cpu")(None, n=4, steps=5, seed=seed)
        o2 = never.load_sampler("cpu")(None, n=4, steps=5, seed=seed)
        assert_close(o1.images, o2.images, atol=1e-6)
        assert_close(o1.attribution_mean, o2.attribution_mean, atol=1e-6)


def test_large_images_get_a_trunk_by_default_and_the_cli_can_refuse_it():
    from service import store_commands
    from service.cli import build_parser

    def config(*flags):
        args = build_parser().parse_args(["train", "x", "--store", "y", *flags])
        return store_commands._store_config(args, (3, 16, 16), public=True)

    assert (config().head_trunk, config().head_hidden) == (64, 64)
    # without a trunk, heads as wide as measured on the pooled pixels
    assert (config("--head-trunk", "0").head_trunk, config("--head-trunk", "0").head_hidden) == (0, 128)
    assert store_commands._store_config(build_parser().parse_args(["train", "x", "--store", "y"]),
                                  (1, 8, 8)).head_trunk == 0  # the digits: pooled pixels


def test_a_trunk_is_never_wider_than_the_public_images_span(datasets, public, tmp_path):
    store = ShardStore.create(tmp_path / "s", datasets, TINY_CONFIG.replace(head_trunk=48),
                              public=public[:20], device="cpu", progress=False)
    assert store.manifest["reference"]["trunk"]["features"] == 20
    assert store.router.load(store).trunk.features == 20


def test_a_damaged_trunk_is_refused_not_used(trunk_store, tmp_path):
    import shutil

    from shards.errors import StoreError

    shutil.copytree(trunk_store.root, tmp_path / "store")
    store = ShardStore.open(tmp_path / "store")
    path = store.root / "reference" / "trunk" / PublicTrunk.FILE
    PublicTrunk(torch.eye(F, 64)).save(path.parent)  # a well-formed file, other weights
    with pytest.raises(StoreError, match="trunk is missing or not the one"):
        store.load_sampler("cpu")
    path.unlink()
    with pytest.raises(StoreError, match="trunk is missing or not the one"):
        store.router.trunk(store)
