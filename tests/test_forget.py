"""Exact forgetting at the library level: exclusion, purge, and the strongest check,
a store that forgot c generates what a store built without c generates."""

import shutil

import pytest
import torch
from conftest import assert_close

from shards import ShardStore
from shards.errors import DataError, StoreError, UnknownContributorError


@pytest.fixture(params=["heads", "joint"])
def any_copy(request, tmp_path):
    """A private, mutable copy of the tiny store of each router."""
    source = request.getfixturevalue("full_store" if request.param == "heads" else "joint_store")
    shutil.copytree(source.root, tmp_path / "store")
    return ShardStore.open(tmp_path / "store")


def test_forgotten_store_equals_store_built_without(any_copy, datasets, public, tmp_path):
    config = any_copy.config
    any_copy.exclude("b")
    audit = any_copy.purge("b")
    never = ShardStore.create(tmp_path / "never", [d for d in datasets if d.contributor_id != "b"],
                              config, public=public, device="cpu", progress=False)
    forgot = ShardStore.open(any_copy.root)
    assert forgot.contributor_ids == never.contributor_ids == ["a", "c"]
    for c in ("a", "c"):
        assert forgot.contributor(c)["weights_hash"] == never.contributor(c)["weights_hash"]
        assert forgot.contributor(c).get("head") == never.contributor(c).get("head")
    assert forgot.manifest["classifier"] == never.manifest["classifier"] or (
        forgot.manifest["classifier"]["weights_hash"] == never.manifest["classifier"]["weights_hash"])
    for seed in (0, 1):
        o1 = forgot.load_sampler("cpu")(None, n=4, steps=5, seed=seed)
        o2 = never.load_sampler("cpu")(None, n=4, steps=5, seed=seed)
        assert_close(o1.images, o2.images, atol=1e-6)
        assert_close(o1.attribution_mean, o2.attribution_mean, atol=1e-6)
    if config.router == "joint":
        assert audit["deleted"] == ["shards/b", "data/b"] and audit["retrained"] == "classifier"
        assert audit["classifier_after"] == never.manifest["classifier"]["weights_hash"]
    else:
        assert audit["deleted"] == ["shards/b", "router/b"] and audit["retrained"] == "nothing"


def test_heads_purge_touches_no_other_contributor(store_copy):
    """Router heads: a purge deletes b's folders and rewrites only the manifest."""
    others = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store_copy.root.rglob("*")
              if p.is_file() and p.name != "manifest.json" and "/b/" not in str(p)}
    store_copy.exclude("b")
    store_copy.purge("b")
    for path, (mtime, data) in others.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path


def test_no_file_or_manifest_entry_of_the_forgotten_remains(any_copy, datasets):
    entry = any_copy.contributor("b")
    any_copy.exclude("b")
    any_copy.purge("b")
    root = any_copy.root
    for folder in ("shards", "router", "data"):
        assert not (root / folder / "b").exists()
    manifest = (root / "manifest.json").read_text()
    assert '"b"' not in manifest and entry["data_hash"] not in manifest
    assert entry["weights_hash"] not in manifest
    b_images = datasets[1].images
    for path in root.rglob("*.safetensors"):
        from safetensors.torch import load_file

        for tensor in load_file(path).values():
            assert not (tensor.shape == b_images.shape and torch.equal(tensor, b_images)), path
    assert "b" not in ShardStore.open(root).load_router().contributor_ids


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
    from shards.data import ContributorData

    with pytest.raises(DataError, match="being forgotten"):  # the same id, before its purge
        reopened.add(ContributorData("a", torch.zeros(2, 1, 8, 8), "x"), progress=False)


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
    # the store can start again
    store.add(datasets[0], progress=False)
    assert store.load_sampler("cpu")(None, n=1, steps=1).contributor_ids == ["a"]


def test_joint_forgetting_everyone_then_adding_trains_from_scratch(joint_store, datasets, tmp_path):
    shutil.copytree(joint_store.root, tmp_path / "j")
    store = ShardStore.open(tmp_path / "j")
    for cid in ["a", "b", "c"]:
        store.exclude(cid)
        store.purge(cid)  # the last purge leaves no classifier, and must not fail
    assert store.manifest["classifier"] is None and store.pending_purges == []
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


def _derive_everything(store, heldout):
    """A valuation (exact by composition, pruned fine-tune) cached in the store, its
    pruned base, and the values recorded in the store's database: everything the
    valuation and the service derive from the contributors' data."""
    from service.credit import record_primary
    from service.db import DB_FILE, Database
    from valuation.run import ValuationSettings, run_valuation

    settings = ValuationSettings(property="quality", methods=("exact", "pruned"), n=8, steps=2,
                                 monolith_steps=4, finetune_steps=3, subset_steps=2,
                                 lds_coalitions=3, top_k=1)
    _, results = run_valuation(store.root, settings, heldout=heldout, progress=False)
    record_primary(Database(store.root / DB_FILE), results)


def _traces(store, contributor_id: str) -> list[str]:
    """What of the contributor is left: cache entries and sample files that depend on it,
    pruned bases trained on it, recorded valuations that value it, folders named for it."""
    import json

    from safetensors import safe_open

    from service.db import DB_FILE, Database

    left = [str(p) for p in store.root.rglob("*") if p.name.startswith((contributor_id, f".{contributor_id}"))
            and "evaluator" not in p.parts]
    for path in (store.root / "valuation" / "cache").glob("*/*.json"):
        if contributor_id in json.loads(path.read_text())["depends_on"]:
            left.append(str(path))
    for path in (store.root / "valuation" / "cache" / "samples").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            if contributor_id in json.loads(f.metadata()["depends_on"]):
                left.append(str(path))
    for path in (store.root / "valuation" / "pruned").glob("*/pruned.json"):
        if contributor_id in json.loads(path.read_text())["depends_on"]:
            left.append(str(path.parent))
    left += [f"valuation {v['method']} in {DB_FILE}" for v in Database(store.root / DB_FILE).valuations()
             if contributor_id in v["values"]]
    return left


@pytest.mark.parametrize("entry", ["library", "cli"])
def test_forget_through_any_entry_point_removes_every_derived_artefact(joint_copy, heldout, entry):
    """The store's own forget (no service running) deletes the valuation caches, the
    pruned bases and the recorded valuations too: the cleaners registered by valuation
    and service (pyproject.toml entry points) run at every purge, whoever calls it."""
    _derive_everything(joint_copy, heldout)
    assert len(_traces(joint_copy, "b")) >= 4  # cache entries, samples, a pruned base, values
    assert (joint_copy.root / "valuation" / "pruned").is_dir()
    if entry == "library":
        audit = joint_copy.forget("b")
        assert audit["derived_dropped"]["pruned-bases"] >= 1
        assert audit["derived_dropped"]["recorded-valuations"] >= 1
        assert audit["derived_dropped"]["valuation-cache"] >= 1
    else:
        from service.cli import main

        assert main(["forget", "b", "--store", str(joint_copy.root)]) == 0
    store = ShardStore.open(joint_copy.root)
    assert store.contributor_ids == ["a", "c"] and store.pending_purges == []
    assert _traces(store, "b") == []


def test_a_purge_refuses_a_store_holding_data_no_cleaner_owns(store_copy, monkeypatch):
    """Derived data that no installed cleaner can forget stops the purge before anything
    is deleted, rather than leave a trace of the contributor behind."""
    (store_copy.root / "derived-by-someone").mkdir()
    store_copy.exclude("b")
    with pytest.raises(StoreError, match="derived-by-someone, which no installed cleaner owns"):
        store_copy.purge("b")
    assert (store_copy.root / "shards" / "b").is_dir() and store_copy.pending_purges == ["b"]
    from shards import Cleaner, forgetting

    monkeypatch.setattr(forgetting, "_registered", {})  # this test's registration only
    forgetting.register_cleaner(Cleaner("test-cleaner", "derived-by-someone", lambda root, cid: 0))
    store_copy.purge("b")
    assert not (store_copy.root / "shards" / "b").exists()
