"""Labelled data and class-conditional composition: folders with labels, label-
conditioned routers (heads and joint), `label` in the sampler, CLI and service."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY, assert_close, write_pngs

from service.auth import create_key
from service.cli import main
from service.platform import Platform
from shards import ShardStore, StoreConfig, TrainConfig, load_contributor, load_contributors
from shards.data import load_labelled_folder
from shards.errors import DataError, LabelUnavailableError
from shards.models import make_noise_schedule, make_unet
from shards.sampler import SampleRequest
from shards.training import train_denoiser

TINY_EMA = replace(TINY, ema=True)
LABELLED = StoreConfig(shard_train=TINY_EMA, base_train=TINY_EMA, lora_train=TINY_EMA,
                       classifier_train=TINY, classifier_update_steps=4, head_train=TINY)
HOLDS = {"a": [0, 1], "b": [1, 2], "c": [3]}


def digits_of(d, count=10):
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = np.round(digits.images / 16 * 255).astype(np.uint8)
    return imgs[digits.target == d][:count]


@pytest.fixture(scope="session")
def labelled_dir(tmp_path_factory):
    """a holds digits {0, 1}, b {1, 2}, c {3} in <label>/ folders; public holds 0..3."""
    root = tmp_path_factory.mktemp("labelled")
    for cid, labels in HOLDS.items():
        for y in labels:
            write_pngs(root / "contributors" / cid / str(y), digits_of(y))
    for y in range(4):
        write_pngs(root / "public" / str(y), digits_of(y, 30)[-8:])
    return root


@pytest.fixture(scope="session", params=["heads", "joint"])
def labelled_store(request, tmp_path_factory, labelled_dir):
    public, labels = load_labelled_folder(labelled_dir / "public")
    return ShardStore.create(tmp_path_factory.mktemp("ls") / request.param,
                             load_contributors(labelled_dir / "contributors"),
                             LABELLED.replace(router=request.param), public=public,
                             public_labels=labels, device="cpu", progress=False)


# ------------------------------------------------------------------ data
def test_label_folders_and_labels_csv_load_the_same_labels(tmp_path, labelled_dir):
    by_folder = load_contributor(labelled_dir / "contributors" / "a")
    assert by_folder.label_counts() == {0: 10, 1: 10}
    flat = tmp_path / "a"
    rows = ["file,label"]
    for y in (0, 1):
        for i, img in enumerate(digits_of(y)):
            name = f"{y}-{i:03d}.png"
            write_pngs(flat / "tmp", img[None])
            (flat / "tmp" / "img-000.png").rename(flat / name)
            rows.append(f"{name},{y}")
    (flat / "tmp").rmdir()
    (flat / "labels.csv").write_text("\n".join(rows) + "\n")
    by_csv = load_contributor(flat)
    assert by_csv.label_counts() == {0: 10, 1: 10}
    assert by_csv.labels.tolist() == sorted(by_csv.labels.tolist())


def test_label_errors_name_the_file(tmp_path):
    flat = tmp_path / "x"
    write_pngs(flat, digits_of(0, 3))
    (flat / "labels.csv").write_text("file,label\nimg-000.png,0\nimg-001.png,1\n")
    with pytest.raises(DataError, match="img-002.png has no label"):
        load_contributor(flat)
    (flat / "labels.csv").write_text("img-000.png,0\nimg-001.png,1\nimg-002.png,seven\n")
    with pytest.raises(DataError, match=r"row 3 \(img-002.png\): label 'seven' is not an integer"):
        load_contributor(flat)
    (flat / "labels.csv").write_text("img-000.png,0\nimg-001.png,1\nimg-002.png,2\nghost.png,1\n")
    with pytest.raises(DataError, match="ghost.png, which is not an image file"):
        load_contributor(flat)
    nested = tmp_path / "y"
    write_pngs(nested / "cat", digits_of(0, 2))
    with pytest.raises(DataError, match="folder cat/: label 'cat' is not an integer"):
        load_contributor(nested)
    write_pngs(nested, digits_of(0, 1))
    with pytest.raises(DataError, match="img-000.png lies beside label folders"):
        load_contributor(nested)


def test_the_data_hash_covers_the_labels(tmp_path):
    write_pngs(tmp_path / "p" / "1", digits_of(1, 2))
    write_pngs(tmp_path / "q" / "2", digits_of(1, 2))
    assert load_contributor(tmp_path / "p").data_hash != load_contributor(tmp_path / "q").data_hash


def test_labelled_and_unlabelled_contributors_do_not_mix(tmp_path, labelled_dir):
    import shutil

    shutil.copytree(labelled_dir / "contributors", tmp_path / "c")
    write_pngs(tmp_path / "c" / "plain", digits_of(5, 4))
    with pytest.raises(DataError, match="'plain' is unlabelled, but the others are labelled"):
        load_contributors(tmp_path / "c")


# ------------------------------------------------------------------ store and sampler
def test_labelled_store_records_label_counts(labelled_store):
    assert labelled_store.num_labels == 4
    for cid, labels in HOLDS.items():
        assert labelled_store.label_counts(cid) == {y: 10 for y in labels}


def test_a_contributor_without_the_label_has_weight_zero_and_is_never_evaluated(labelled_store):
    sampler = labelled_store.load_sampler("cpu")
    seen = []
    evaluate = sampler.bank.evaluate
    sampler.bank.evaluate = lambda x, t, ids, labels=None: seen.extend(ids) or evaluate(x, t, ids, labels)
    from shards.routing import Routing

    both = sampler.sample_batch([SampleRequest(("a", "b"), 3, 5, (0,))], steps=4,
                                routing=Routing("dense"))[0]
    assert set(seen) == {"a"}  # b holds no 0
    assert both.attribution_mean[:, 1].abs().max() == 0 and both.labels.tolist() == [0, 0, 0]
    alone = sampler.sample_batch([SampleRequest(("a",), 3, 5, (0,))], steps=4)[0]
    assert_close(both.images, alone.images)  # restricted composition: exactly a's model


def test_shared_label_mixes_by_label_prior(labelled_store):
    """Label 1 is held by a and b: both get weight, and the weights are the closed
    form softmax(r_i(x, t, 1) + log lambda_i(1)) over {a, b}."""
    sampler = labelled_store.load_sampler("cpu")
    from shards.routing import posterior_weights

    x, t, y = torch.randn(5, 1, 8, 8), torch.full((5,), 500), torch.full((5,), 1)
    scores = sampler.router.log_ratios(x, t, y)
    k = [sampler.classifier_ids.index(c) for c in ("a", "b")]
    log_prior = torch.log(sampler.label_prior[k, 1]).float()
    expected = torch.softmax(scores[:, k] + log_prior, dim=1)
    allowed = torch.tensor([c in ("a", "b") for c in sampler.classifier_ids])
    w = posterior_weights(scores, torch.log(sampler.label_prior[:, 1].clamp_min(1e-300)).float(),
                          allowed.expand(5, -1))
    assert_close(w[:, k], expected)
    out = sampler.sample_batch([SampleRequest(("a", "b"), 4, 2, (1,))], steps=3)[0]
    assert (out.attribution_mean > 0).all()


def test_unavailable_label_names_the_label_and_who_holds_what(labelled_store):
    sampler = labelled_store.load_sampler("cpu")
    with pytest.raises(LabelUnavailableError, match=r"holds label 3; labels held: a: 0, 1; b: 1, 2"):
        sampler.sample_batch([SampleRequest(("a", "b"), 2, 0, (3,))], steps=2)
    with pytest.raises(LabelUnavailableError, match="label 9"):
        sampler.sample_batch([SampleRequest(None, 2, 0, (9,))], steps=2)
    out = sampler.sample_batch([SampleRequest(None, 3, 0, (1, 2))], steps=2)[0]
    assert out.labels.tolist() == [1, 2, 1]  # a shorter list repeats to fill n


def test_unconditional_draws_labels_from_the_coalition(labelled_store):
    sampler = labelled_store.load_sampler("cpu")
    out = sampler.sample_batch([SampleRequest(("b", "c"), 40, 3)], steps=2)[0]
    assert set(out.labels.tolist()) <= {1, 2, 3} and len(set(out.labels.tolist())) == 3
    # per-image labels, mixed in one request
    out = sampler.sample_batch([SampleRequest(None, 3, 3, (0, 2, 3))], steps=2)[0]
    assert out.labels.tolist() == [0, 2, 3]
    held = dict(zip(out.contributor_ids, out.attribution_mean.T, strict=True))
    assert held["c"][:2].abs().max() == 0 and held["c"][2] == 1  # only c holds 3


def test_adding_to_a_labelled_store_checks_labels(labelled_store, tmp_path):
    import shutil

    shutil.copytree(labelled_store.root, tmp_path / "s")
    store = ShardStore.open(tmp_path / "s")
    write_pngs(tmp_path / "plain", digits_of(2, 4))
    with pytest.raises(DataError, match="'plain' is unlabelled, but the store is labelled"):
        store.add(load_contributor(tmp_path / "plain"), progress=False, device="cpu")
    write_pngs(tmp_path / "far" / "7", digits_of(7, 4))
    with pytest.raises(DataError, match=r"label\(s\) \[7\].*allowed: 0\.\.3"):
        store.add(load_contributor(tmp_path / "far"), progress=False, device="cpu")
    write_pngs(tmp_path / "dee" / "3", digits_of(3, 6))
    store.add(load_contributor(tmp_path / "dee"), progress=False, device="cpu")
    out = store.load_sampler("cpu").sample_batch([SampleRequest(("c", "dee"), 2, 0, (3,))], steps=2)[0]
    assert out.contributor_ids == ["c", "dee"] and (out.attribution_mean.sum(1) - 1).abs().max() < 1e-5


def test_a_label_on_an_unlabelled_store_is_unavailable(full_store):
    with pytest.raises(LabelUnavailableError, match="this store is unlabelled"):
        full_store.load_sampler("cpu").sample_batch([SampleRequest(None, 1, 0, (1,))], steps=1)


def test_ema_changes_the_saved_weights():
    data = torch.rand(16, 1, 8, 8) * 2 - 1
    sched = make_noise_schedule()
    plain, averaged = make_unet((1, 8, 8), seed=0), make_unet((1, 8, 8), seed=0)
    train_denoiser(plain, data, sched, TrainConfig(steps=20, batch_size=4, warmup_steps=0), 0,
                   progress=False)
    train_denoiser(averaged, data, sched, TrainConfig(steps=20, batch_size=4, warmup_steps=0,
                                                      ema=True), 0, progress=False)
    diff = max((p - q).abs().max().item() for p, q in zip(plain.parameters(), averaged.parameters(),
                                                          strict=True))
    assert diff > 1e-4


# ------------------------------------------------------------------ CLI and service
def test_cli_sample_with_label(tmp_path, labelled_dir, capsys):
    store = tmp_path / "store"
    assert main(["train", str(labelled_dir / "contributors"), "--store", str(store), "--public",
                 str(labelled_dir / "public"), "--shard-steps", "4", "--head-steps", "4"]) == 0
    assert "labels 0,1" in capsys.readouterr().out
    assert main(["sample", "--store", str(store), "--label", "2", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "two.npz")]) == 0
    npz = np.load(tmp_path / "two.npz")
    assert npz["labels"].tolist() == [2, 2]
    assert npz["attribution_mean"][:, 0].max() == 0  # a holds no 2
    assert main(["sample", "--store", str(store), "--label", "8", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "holds label 8" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert main(["train", str(labelled_dir / "contributors"), "--store", str(plain), "--public",
                 str(labelled_dir / "public"), "--shard-steps", "4", "--head-steps", "4",
                 "--no-labels"]) == 0
    assert ShardStore.open(plain).num_labels == 0


def test_service_generates_by_label_and_lists_labels(labelled_store, tmp_path):
    import shutil

    shutil.copytree(labelled_store.root, tmp_path / "s")
    platform = Platform(tmp_path / "s", device="cpu")
    try:
        rows = {r["contributor_id"]: r["labels"] for r in platform.contributors()}
        assert rows == {c: {str(y): 10 for y in ys} for c, ys in HOLDS.items()}
        user = platform.verify(f"Bearer {create_key(platform.db, 'u', ['a', 'b'])}")
        out = platform.generate(user, n=2, steps=2, label=1)
        assert out["labels"] == [1, 1] and out["contributors"] == ["a", "b"]
        out = platform.generate(user, n=2, steps=2, label=[0, 2])
        assert out["labels"] == [0, 2]
        assert out["attribution"]["a"][1] == 0 and out["attribution"]["b"][0] == 0
        # c holds 3, but the key is not licensed for c: the error lists a and b only
        with pytest.raises(LabelUnavailableError, match=r"label 3; labels held: a: 0, 1; b: 1, 2$"):
            platform.generate(user, n=1, steps=2, label=3)
        assert platform.generate(user, n=3, steps=2, label=[1, 2])["labels"] == [1, 2, 1]
    finally:
        platform.close()


def test_forgetting_in_a_labelled_store_leaves_what_a_store_without_it_has(labelled_store, tmp_path,
                                                                          labelled_dir):
    """Exactness of forgetting with labels: after purging c, the router is what a store
    built without c has (joint: the classifier retrained from scratch, bit-identical;
    heads: c's head gone, the others untouched), and no file names c."""
    import shutil

    shutil.copytree(labelled_store.root, tmp_path / "s")
    store = ShardStore.open(tmp_path / "s")
    store.exclude("c")
    store.purge("c", device="cpu")
    public, labels = load_labelled_folder(labelled_dir / "public")
    without = ShardStore.create(tmp_path / "without", [d for d in load_contributors(
        labelled_dir / "contributors") if d.contributor_id != "c"], store.config, public=public,
        public_labels=labels, device="cpu", progress=False)
    assert store.contributor_ids == without.contributor_ids == ["a", "b"]
    if store.config.router == "joint":
        assert store.manifest["classifier"]["weights_hash"] == without.manifest["classifier"]["weights_hash"]
    else:
        for cid in ("a", "b"):
            assert store.contributor(cid)["head"]["weights_hash"] == \
                without.contributor(cid)["head"]["weights_hash"]
    assert not [p for p in (tmp_path / "s").rglob("*") if p.name == "c"]
    out = store.load_sampler("cpu").sample_batch([SampleRequest(None, 2, 0, (1,))], steps=2)[0]
    assert out.contributor_ids == ["a", "b"]
