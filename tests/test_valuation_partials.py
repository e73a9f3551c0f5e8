"""Partial files of valuation (interrupted writes, builds in progress) are never out of
reach of a forget: `UtilityCache.drop` and `drop_pruned_bases` delete them, whoever
they were for, and count them."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import valuation.cache as cache_module
import valuation.monolith as monolith
from valuation.cache import UtilityCache
from valuation.monolith import STAGING_PREFIX, PrunedFinetuneUtility, drop_pruned_bases
from valuation.properties import build_evaluator


def entry(depends_on):
    return {"value": 1.0, "seconds": 0.1, "depends_on": depends_on}


def images():
    return torch.zeros(2, 1, 4, 4)


# --------------------------------------------------------------- utility cache


def test_hand_made_tmp_files_are_dropped_and_counted(tmp_path):
    cache = UtilityCache(tmp_path / "cache")
    cache.put("game", "kept", entry(["a"]))
    cache.put_images("kept", images(), ["a"])
    partial = [cache.root / "samples" / ".k1.tmp",  # put_images' (older name)
               cache.root / "samples" / ".k2.1a2b3c4d.tmp",  # put_images'
               cache.root / "samples" / ".tmpAb12Cd",  # safetensors' own
               cache.root / "game" / ".k3.json.0123abcd.tmp"]  # write_json_atomic's
    for path in partial:
        path.write_bytes(b"half a file that depends on nobody knows whom")
    assert cache.drop("c") == len(partial)
    assert not any(p.exists() for p in partial)
    assert cache.get("game", "kept") is not None and cache.get_images("kept") is not None
    assert cache.drop("a") == 2 and not list(cache.root.rglob("*.*"))


def test_unreadable_entries_and_samples_are_dropped(tmp_path):
    cache = UtilityCache(tmp_path / "cache")
    cache.put("game", "kept", entry(["a"]))
    (cache.root / "game" / "cut.json").write_text('{"value": 1.0, "depe')
    (cache.root / "game" / "odd.json").write_text('{"value": 1.0}')
    cache.put_images("cut", images(), ["a"])
    sample = cache.root / "samples" / "cut.safetensors"
    sample.write_bytes(sample.read_bytes()[:20])
    assert cache.drop("c") == 3
    assert [p.name for p, _ in cache.entries()] == ["kept.json"]


def killed_writer(cache_root, call):
    """Run `call` (on UtilityCache `cache`) in a process that dies (os._exit) at the
    rename that would have published the write: what a kill -9 or a power cut leaves."""
    code = textwrap.dedent(f"""
        import os, torch
        from valuation.cache import UtilityCache
        cache = UtilityCache({str(cache_root)!r})
        (cache.root / "samples").mkdir(parents=True, exist_ok=True)
        (cache.root / "game").mkdir(parents=True, exist_ok=True)
        os.replace = lambda *args: os._exit(7)
        {call}
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 7, result.stderr


def test_writers_killed_before_the_rename_leave_tmp_files_that_drop_removes(tmp_path):
    root = tmp_path / "cache"
    killed_writer(root, "cache.put_images('k', torch.ones(2, 1, 4, 4), ['a'])")
    killed_writer(root, "cache.put('game', 'k', {'value': 1.0, 'seconds': 0.1, 'depends_on': ['a']})")
    left = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert len(left) == 2 and all(name.endswith(".tmp") for name in left), left
    cache = UtilityCache(root)
    assert cache.get_images("k") is None and cache.get("game", "k") is None
    assert cache.drop("zed") == 2  # no one can tell whom they depend on: all dropped
    assert not [p for p in root.rglob("*") if p.is_file()]


def test_a_writer_interrupted_by_an_exception_leaves_nothing(tmp_path, monkeypatch):
    cache = UtilityCache(tmp_path / "cache")

    def broken(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.os, "replace", broken)
    with pytest.raises(KeyboardInterrupt):
        cache.put_images("k", images(), ["a"])
    monkeypatch.undo()
    assert not [p for p in cache.root.rglob("*") if p.is_file()]


def test_a_write_whose_tmp_file_a_forget_dropped_is_not_cached(tmp_path, monkeypatch):
    cache = UtilityCache(tmp_path / "cache")
    dropped = []

    def save_then_forget(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        dropped.append(cache.drop("c"))  # a forget runs between the write and the rename

    monkeypatch.setattr(cache_module, "save_file", save_then_forget)
    cache.put_images("k", images(), ["a"])  # no error: the samples just are not cached
    assert dropped == [1] and cache.get_images("k") is None
    assert not [p for p in cache.root.rglob("*") if p.is_file()]


# --------------------------------------------------------------- pruned bases


def base(root, name, depends_on, complete=True):
    """A stored pruned base (or a partial one) under STORE/valuation/pruned/."""
    folder = root / "valuation" / "pruned" / name
    (folder / "monolith").mkdir(parents=True)
    (folder / "monolith" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / "pruned.safetensors").write_bytes(b"weights")
        (folder / "pruned.json").write_text(json.dumps({"depends_on": depends_on}))
    return folder


def test_hand_made_partial_bases_are_dropped_whoever_they_name(tmp_path):
    kept = base(tmp_path, "k1", ["a", "b"])
    dropped = [
        base(tmp_path, "k2", ["a", "c"]),  # shaped by c
        base(tmp_path, f"{STAGING_PREFIX}k3-0a1b2c3d", None, complete=False),  # interrupted
        base(tmp_path, f"{STAGING_PREFIX}k4-4e5f6a7b", ["a"]),  # staged, not yet renamed
        base(tmp_path, "k5", None, complete=False),  # an older version's half-written base
        base(tmp_path, "k6", ["a"], complete=False),
    ]
    (dropped[-1] / "pruned.json").write_text('{"depends_on": ["a"')  # cut short
    stray = tmp_path / "valuation" / "pruned" / ".pruned.json.0123abcd.tmp"
    stray.write_text("{")
    dropped.append(stray)
    assert drop_pruned_bases(tmp_path, "c") == len(dropped)
    assert not any(p.exists() for p in dropped) and kept.exists()
    assert drop_pruned_bases(tmp_path, "c") == 0
    assert drop_pruned_bases(tmp_path, "b") == 1 and not kept.exists()
    assert drop_pruned_bases(tmp_path / "no-store", "b") == 0


class FakeStore:
    """What `prepare` asks of the store: its root, and the live ids when it publishes
    (under the store's write lock)."""

    live = ["a", "b"]

    def __init__(self, root):
        self.root = root

    @classmethod
    def open(cls, root):
        return cls(root)

    @property
    def contributor_ids(self):
        return list(self.live)

    def write_lock(self):
        import contextlib

        return contextlib.nullcontext(self)


@pytest.fixture
def pruned(tmp_path, monkeypatch):
    """A PrunedFinetuneUtility whose steps 1-3 (`_build_base`) each test replaces."""
    monkeypatch.setattr(monolith, "ShardStore", FakeStore)
    monkeypatch.setattr(FakeStore, "live", ["a", "b"])
    u = PrunedFinetuneUtility.__new__(PrunedFinetuneUtility)
    u.store, u.players = FakeStore(tmp_path), ("a", "b")
    u.folder = tmp_path / "valuation" / "pruned" / "0123456789abcdef"
    return u


def entries(u):
    return sorted(p.name for p in u.folder.parent.iterdir())


def write_base(staging, meta=None):
    (staging / "monolith").mkdir(parents=True, exist_ok=True)
    (staging / "monolith" / "weights").write_bytes(b"w")
    (staging / "pruned.safetensors").write_bytes(b"w")
    meta = meta or {"depends_on": ["a", "b"], "kept": 0.5}
    (staging / "pruned.json").write_text(json.dumps(meta))
    return meta


def test_prepare_publishes_with_pruned_json_and_drop_finds_it(pruned):
    pruned._build_base = write_base
    assert pruned.prepare()["kept"] == 0.5
    assert entries(pruned) == [pruned.folder.name]  # no staging left
    assert json.loads((pruned.folder / "pruned.json").read_text())["depends_on"] == ["a", "b"]
    pruned._build_base = None  # stored: not built again
    assert pruned.prepare()["kept"] == 0.5
    assert drop_pruned_bases(pruned.store.root, "b") == 1 and entries(pruned) == []


def test_an_interrupted_build_leaves_nothing(pruned):
    def build(staging):
        (staging / "monolith").mkdir()
        (staging / "monolith" / "weights").write_bytes(b"trained on a and b")
        raise KeyboardInterrupt  # or any error in steps 2-3

    pruned._build_base = build
    with pytest.raises(KeyboardInterrupt):
        pruned.prepare()
    assert entries(pruned) == []


def test_a_forget_during_the_build_deletes_the_staging_folder_and_fails_the_build(pruned):
    dropped = []

    def build(staging):
        (staging / "monolith").mkdir()
        dropped.append(drop_pruned_bases(pruned.store.root, "zed"))  # someone else's forget
        return write_base(staging)  # like save_pretrained: makes the folder again

    pruned._build_base = build
    with pytest.raises(RuntimeError, match="staging folder was deleted while it was built"):
        pruned.prepare()
    assert dropped == [1] and entries(pruned) == []

    def build_then_fail(staging):
        drop_pruned_bases(pruned.store.root, "zed")
        save_file({"w": torch.zeros(1)}, str(staging / "pruned.safetensors"))

    pruned._build_base = build_then_fail
    with pytest.raises(RuntimeError, match="discarded, run the valuation again"):
        pruned.prepare()
    assert entries(pruned) == []


def test_a_player_forgotten_during_the_build_discards_the_base(pruned, monkeypatch):
    def build(staging):
        monkeypatch.setattr(FakeStore, "live", ["a"])  # b excluded meanwhile
        return write_base(staging)

    pruned._build_base = build
    with pytest.raises(RuntimeError, match=r"contributors \['b'\] .* forgotten"):
        pruned.prepare()
    assert entries(pruned) == []


def test_an_older_half_written_base_is_replaced(pruned):
    base(pruned.store.root, pruned.folder.name, None, complete=False)
    pruned._build_base = write_base
    assert pruned.prepare()["kept"] == 0.5
    assert (pruned.folder / "pruned.json").exists() and entries(pruned) == [pruned.folder.name]


def test_a_base_another_writer_published_first_wins(pruned):
    def build(staging):
        theirs = pruned.folder.parent / "theirs"
        theirs.mkdir()
        write_base(theirs, {"depends_on": ["a", "b"], "kept": 0.25})
        theirs.rename(pruned.folder)
        return write_base(staging)

    pruned._build_base = build
    assert pruned.prepare()["kept"] == 0.25
    assert entries(pruned) == [pruned.folder.name]


def test_real_pruned_base_interrupted_then_built_then_dropped(joint_copy, heldout, monkeypatch):
    """The real steps 1-3 on a tiny store: an error at the pruned weights' write
    leaves no staging folder; a finished base names every player and a forget drops it."""
    build_evaluator(joint_copy.root, heldout)
    u = PrunedFinetuneUtility(joint_copy.root, "quality", n=8, steps=2,
                              monolith={"steps": 4, "warmup_steps": 0},
                              finetune={"steps": 2, "warmup_steps": 0})
    pruned_root = u.folder.parent

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(monolith, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        u.prepare()
    assert list(pruned_root.iterdir()) == []
    monkeypatch.undo()
    meta = u.prepare()
    assert meta["depends_on"] == list(u.players) and meta["kept"] < 1.0
    assert [p.name for p in pruned_root.iterdir()] == [u.folder.name]
    assert u.base() is not None
    assert drop_pruned_bases(joint_copy.root, u.players[-1]) == 1
    assert list(pruned_root.iterdir()) == []
