"""The embedded demo data: the default split is unchanged, and `contributors=N` splits
the owned digits among N - 1 honest contributors plus the planted `mallory`."""

import hashlib
import json
from pathlib import Path

import pytest

from shards.demo import LOW_QUALITY, MIN_IMAGES, OWNERS, max_contributors, write_demo_data
from shards.errors import DataError

# owners.json of the default split (seed 0) before the N-split existed
DEFAULT_IMAGES = {"alice": 200, "bob": 200, "carol": 202, "dave": 200, "erin": 98,
                  "frank": 98, "mallory": 80}


def tree_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "default"
    write_demo_data(out, seed=0)
    return out


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "n32"
    write_demo_data(out, seed=0, contributors=32)
    return out


def owners(root: Path) -> dict:
    return json.loads((root / "owners.json").read_text())


def test_default_split_is_unchanged(default_dir):
    table = owners(default_dir)
    assert list(table) == ["seed", "contributors", "public_images", "heldout_images"]
    contributors = table["contributors"]
    assert {cid: e["images"] for cid, e in contributors.items()} == DEFAULT_IMAGES
    for cid, classes in OWNERS.items():
        assert contributors[cid]["classes"] == classes and not contributors[cid]["corrupted"]
    assert contributors[LOW_QUALITY] == {"classes": list(range(10)), "images": 80,
                                         "corrupted": True}
    for cid, entry in contributors.items():  # labelled: one <digit>/ folder per class held
        folder = default_dir / "contributors" / cid
        assert len(list(folder.glob("*/*.png"))) == entry["images"]
        assert sorted(int(p.name) for p in folder.iterdir()) == entry["classes"]
    assert len(list((default_dir / "public").glob("*/*.png"))) == table["public_images"] == 269
    assert sorted(int(p.name) for p in (default_dir / "public").iterdir()) == list(range(10))


def test_n_split_contributors(split_dir):
    table = owners(split_dir)
    contributors = table["contributors"]
    assert table["contributors_requested"] == 32
    folders = sorted(p.name for p in (split_dir / "contributors").iterdir())
    assert len(folders) == 32 and LOW_QUALITY in folders
    assert sorted(contributors) == folders
    honest = {cid: e for cid, e in contributors.items() if cid != LOW_QUALITY}
    assert sorted(honest) == [f"c{i:03d}" for i in range(31)]
    assert all(1 <= len(e["classes"]) <= 3 and not e["corrupted"] for e in honest.values())
    assert set().union(*(e["classes"] for e in honest.values())) == set(range(10))
    assert contributors[LOW_QUALITY]["corrupted"]
    for cid, entry in contributors.items():
        n_files = len(list((split_dir / "contributors" / cid).glob("*/*.png")))
        assert n_files == entry["images"] >= MIN_IMAGES


def test_n_split_images_are_disjoint(split_dir):
    seen: dict[str, str] = {}
    for folder in sorted((split_dir / "contributors").iterdir()):
        if folder.name == LOW_QUALITY:
            continue
        for png in folder.glob("*/*.png"):
            digest = hashlib.sha256(png.read_bytes()).hexdigest()
            assert digest not in seen, f"{png} duplicates an image of {seen.get(digest)}"
            seen[digest] = folder.name


def test_n_split_keeps_heldout_public_and_mallory(default_dir, split_dir):
    for sub in ["heldout", "public", f"contributors/{LOW_QUALITY}"]:
        assert tree_digests(split_dir / sub) == tree_digests(default_dir / sub), sub
    assert owners(split_dir)["heldout_images"] == owners(default_dir)["heldout_images"]


def test_n_split_is_deterministic(split_dir, tmp_path):
    write_demo_data(tmp_path / "again", seed=0, contributors=32)
    assert (tmp_path / "again" / "owners.json").read_bytes() == \
        (split_dir / "owners.json").read_bytes()
    assert tree_digests(tmp_path / "again") == tree_digests(split_dir)


def test_largest_n_succeeds(tmp_path):
    top = max_contributors()
    table = write_demo_data(tmp_path / "top", contributors=top)
    assert len(table["contributors"]) == top
    assert min(e["images"] for e in table["contributors"].values()) >= MIN_IMAGES


def test_too_many_contributors_names_the_maximum(tmp_path):
    top = max_contributors()
    with pytest.raises(DataError, match=rf"contributors={top + 1}.*at most {top}"):
        write_demo_data(tmp_path / "x", contributors=top + 1)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", [1, 0, -2, 4])
def test_too_few_contributors(tmp_path, bad):
    with pytest.raises(DataError, match=rf"contributors={bad} is too small.*from 5 to"):
        write_demo_data(tmp_path / "x", contributors=bad)


@pytest.mark.parametrize("bad", [7.0, "7", True])
def test_non_int_contributors(tmp_path, bad):
    with pytest.raises(DataError, match="is not an int"):
        write_demo_data(tmp_path / "x", contributors=bad)
