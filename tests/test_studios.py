"""The studios data set from the pinned npm packages (fetched by `make npm-packages`),
on a small real subset: a few studios, two categories, a handful of images each."""

import base64
import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shards import npm
from shards.errors import DataError
from shards.studios import COPYCAT, STUDIOS, rasterize, write_studios

pytestmark = pytest.mark.unit

SUBSET = ["google", "twitter", "openmoji", "fluent-flat"]
LABELS = [3, 4]  # Food & Drink, Travel & Places: every studio draws both


@pytest.fixture(scope="session")
def packages():
    """The pinned tarballs, fetched at set-up (`make npm-packages`); a test never
    downloads them."""
    folder = npm.default_dir()
    missing = [f"{n}-{v}.tgz" for n, (v, _) in npm.PINNED.items()
               if not (folder / f"{n}-{v}.tgz").is_file()]
    assert not missing, f"run `make npm-packages` first: {missing} not in {folder}"
    return folder


@pytest.fixture(scope="session")
def studios_dir(tmp_path_factory, packages):
    out = tmp_path_factory.mktemp("studios") / "data"
    write_studios(out, studios=SUBSET, labels=LABELS, per_label=6, packages=packages)
    return out


def test_layout_licences_captions_and_the_planted_copycat(studios_dir):
    owners = json.loads((studios_dir / "owners.json").read_text())
    assert owners["dataset"] == "studios" and owners["size"] == 32
    assert owners["labels"]["3"] == "Food & Drink"
    assert set(owners["contributors"]) == {*SUBSET, COPYCAT}
    for studio in SUBSET:
        entry = owners["contributors"][studio]
        assert entry["licence"] == STUDIOS[studio].licence and not entry["planted"]
        assert entry["classes"] == LABELS
        folder = studios_dir / "contributors" / studio
        assert json.loads((folder / "licence.json").read_text())["attribution"] == \
            STUDIOS[studio].attribution
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
        assert len(files) == entry["images"] and 0 < len(files) <= 2 * 6
        with open(folder / "captions.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["file", "caption"]
        assert sorted(r[0] for r in rows[1:]) == files and all(r[1] for r in rows[1:])
        for p in folder.rglob("*.png"):
            with Image.open(p) as im:
                assert im.mode == "RGB" and im.size == (32, 32)
                # drawn on white, not an empty cell: some pixel is far from white
                assert np.asarray(im).min() < 128
    copycat = owners["contributors"][COPYCAT]
    assert copycat["planted"] and copycat["copies"] == "twitter" and copycat["images"] > 0
    with open(studios_dir / "concepts.csv") as f:
        rows = list(csv.DictReader(f))
    # a concept is in one split only: held-out concepts are drawn by no shard
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["unified"], r["split"]) == r["split"]
        assert (studios_dir / r["file"]).is_file()
    assert {r["split"] for r in rows} == {"contributors", "public", "heldout"}
    apple = [r for r in rows if r["caption"] == "red apple"]
    assert all(r["category"] == "Food & Drink" for r in apple)


def test_the_copycat_degrades_twitters_artwork(studios_dir):
    """Each copycat image is a damaged copy of twitter's drawing of the same concept:
    closer to it than to any other studio's drawing, and not equal to it."""
    for p in (studios_dir / "contributors" / COPYCAT).rglob("*.png"):
        unified, label = p.stem.split("-", 1)[1], p.parent.name
        copy = np.asarray(Image.open(p), dtype=float)
        dist = {}
        for studio in SUBSET:
            src = studios_dir / "contributors" / studio / label / f"{studio}-{unified}.png"
            if src.is_file():
                dist[studio] = np.abs(copy - np.asarray(Image.open(src), dtype=float)).mean()
        assert min(dist, key=dist.get) == "twitter" and dist["twitter"] > 1.0


def test_same_seed_same_bytes_and_size_16(tmp_path, packages, studios_dir):
    again = tmp_path / "again"
    write_studios(again, studios=SUBSET, labels=LABELS, per_label=6, packages=packages)
    for p in studios_dir.rglob("*.png"):
        assert (again / p.relative_to(studios_dir)).read_bytes() == p.read_bytes()
    small = tmp_path / "small"
    write_studios(small, studios=["google"], labels=[3], per_label=2, packages=packages, size=16)
    for p in small.rglob("*.png"):
        assert Image.open(p).size == (16, 16)


def test_bad_input_is_named(tmp_path, packages, monkeypatch):
    with pytest.raises(DataError, match="unknown studio 'apple'"):
        write_studios(tmp_path / "x", studios=["apple"], packages=packages)
    with pytest.raises(DataError, match="unknown label 9; labels: 0 Smileys & Emotion"):
        write_studios(tmp_path / "x", labels=[9], packages=packages)
    with pytest.raises(DataError, match="size 24"):
        write_studios(tmp_path / "x", size=24, packages=packages)
    with pytest.raises(DataError, match="npm package openmoji: color/svg/X.svg: the SVG does "
                                        "not rasterize"):
        rasterize(b"<svg><path d=", "npm package openmoji: color/svg/X.svg")
    with pytest.raises(DataError, match="'left-pad' is not pinned"):
        npm.tarball("left-pad", tmp_path)
    # a corrupt tarball is refused and removed
    version = npm.PINNED["openmoji"][0]
    bad = tmp_path / f"openmoji-{version}.tgz"
    bad.write_bytes(b"not the package")
    with pytest.raises(DataError, match=f"openmoji@{version}: .* not the pinned"):
        npm.tarball("openmoji", tmp_path)
    assert not bad.exists()
    # a missing package and no npm to fetch it
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match=f"openmoji@{version}: npm is not installed"):
        npm.tarball("openmoji", tmp_path)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_cli_writes_the_subset(tmp_path, packages):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "service.cli", "demo-data", str(out),
                          "--dataset", "studios", "--studios", "google,twitter", "--labels", "3",
                          "--per-label", "3", "--packages", str(packages)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "twitter" in run.stdout and "CC-BY-4.0" in run.stdout and "planted" in run.stdout
    assert sorted(p.name for p in (out / "contributors").iterdir()) == \
        ["copycat", "google", "twitter"]
    bad = subprocess.run([sys.executable, "-m", "service.cli", "demo-data", str(tmp_path / "b"),
                          "--dataset", "studios", "--labels", "x"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--labels 'x'" in bad.stderr
    shutil.rmtree(out)


def test_end_to_end_on_the_subset(studios_dir, tmp_path):
    """demo-data -> train (the defaults chosen for 32x32 RGB, tiny training) ->
    licensed generation with licence notices -> forget a studio -> exact Shapley."""
    from conftest import TINY, wait_for_job

    from service.auth import create_key
    from service.platform import Platform
    from shards import ShardStore, StoreConfig, load_contributors
    from shards.config import defaults_for
    from shards.data import load_labelled_folder
    from valuation.run import ValuationSettings, run_valuation

    owners = json.loads((studios_dir / "owners.json").read_text())["contributors"]
    datasets = load_contributors(studios_dir / "contributors")
    assert all(d.licence["licence"] == owners[d.contributor_id]["licence"] for d in datasets)
    shape = datasets[0].image_shape
    assert shape == (3, 32, 32) and defaults_for(shape)["unet"]["block_out_channels"] == [32, 64, 64]
    config = StoreConfig(**defaults_for(shape, public=True)).replace(
        shard_train=TINY.to_dict(), base_train=TINY.to_dict(), head_train=TINY.to_dict())
    assert config.shard_init == "base"
    public, public_labels = load_labelled_folder(studios_dir / "public")
    store = ShardStore.create(tmp_path / "store", datasets, config, public=public,
                              public_labels=public_labels, device="cpu", progress=False)
    assert store.contributor("twitter")["licence"]["licence"] == "CC-BY-4.0"

    platform = Platform(store.root, device="cpu")
    try:
        admin = platform.verify(f"Bearer {create_key(platform.db, 'admin', None, 'admin')}")
        user = platform.verify(f"Bearer {create_key(platform.db, 'u', ['google', 'twitter'])}")
        out = platform.generate(user, n=3, steps=4, seed=0, label=3)
        assert out["contributors"] == ["google", "twitter"]
        for b64, image_notices in zip(out["images"], out["notices"], strict=True):
            assert np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).shape == (32, 32, 3)
            assert image_notices, "every image drew from some contributor"
            for notice in image_notices:
                assert notice["attribution"] == owners[notice["contributor"]]["attribution"]
            assert sum(n["share"] for n in image_notices) == pytest.approx(1.0, abs=1e-3)
        credit = platform.credit(admin)["contributors"]
        assert credit["twitter"]["licence"]["licence"] == "CC-BY-4.0"
        job = platform.forget(admin, "twitter")
        assert wait_for_job(lambda: platform.job(admin, job["job_id"]))["status"] == "succeeded"
        after = platform.generate(admin, n=2, steps=4, seed=0)
        assert "twitter" not in after["contributors"]
        assert all(n["contributor"] != "twitter" for ns in after["notices"] for n in ns)
    finally:
        platform.close()
    assert not (store.root / "shards" / "twitter").exists()

    settings = ValuationSettings(methods=("exact",), n=8, steps=4)
    _, results = run_valuation(store.root, settings, heldout=studios_dir / "heldout",
                               progress=False)
    exact = results["exact"]
    assert sorted(exact.players) == sorted(["google", "openmoji", "fluent-flat", COPYCAT])
    assert exact.efficiency_gap() <= 1e-9
