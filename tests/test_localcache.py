"""A host's local copies of shard weights (CDM_LOCAL_CACHE) for a store on shared
storage: read from the volume once, checked against the weights hash at every read,
and deleted on every host when the contributor is forgotten."""

import os
import shutil
import time

from shards import ShardStore
from shards.files import read_weights, weights_hash
from shards.localcache import LocalCache


def test_a_copy_is_made_once_checked_at_every_read_and_pruned(tmp_path):
    volume = tmp_path / "volume" / "a"
    volume.mkdir(parents=True)
    (volume / "w.safetensors").write_bytes(b"weights of a")
    h = weights_hash(read_weights(volume))
    cache = LocalCache(tmp_path / "cache")
    assert cache.read("a", volume, h) == {"w.safetensors": b"weights of a"}
    copy = tmp_path / "cache" / "a" / h / "w.safetensors"
    assert copy.read_bytes() == b"weights of a"
    shutil.rmtree(volume)  # the volume is gone: the verified copy is read
    assert cache.read("a", volume, h) == {"w.safetensors": b"weights of a"}
    copy.write_bytes(b"tampered")  # a copy that fails its hash is never returned
    assert cache.read("a", volume, h) == {}
    (tmp_path / "cache" / "a" / ".x.partial").mkdir()  # a copy being written: kept
    (tmp_path / "cache" / "a" / ".y.partial").mkdir()  # left by a crash an hour ago
    os.utime(tmp_path / "cache" / "a" / ".y.partial", (time.time() - 3600,) * 2)
    (tmp_path / "cache" / "b" / "oldhash").mkdir(parents=True)
    gone = cache.prune({"a": h})
    assert sorted(gone) == ["a/.y.partial", "b/oldhash"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a"]
    shutil.rmtree(tmp_path / "cache" / "a" / ".x.partial")
    assert cache.prune({}) == [f"a/{h}"] and not any((tmp_path / "cache").iterdir())


def test_every_host_drops_a_forgotten_contributors_copies(store_copy, tmp_path, monkeypatch):
    """Two hosts (two store objects with caches of their own) sample with every
    contributor; one forgets b: its copies leave this host's disk at the exclusion
    and the other host's at its next refresh; the samples are the same with a cache."""
    import torch

    from shards.routing import Routing

    dense = Routing.parse("dense")  # every shard at every step: all are loaded
    root = store_copy.root
    without = ShardStore.open(root).load_sampler("cpu")(None, n=2, steps=3, seed=0, routing=dense)
    hosts = []
    for name in ("host-a", "host-b"):
        monkeypatch.setenv("CDM_LOCAL_CACHE", str(tmp_path / name))
        hosts.append(ShardStore.open(root))
    one, two = hosts
    for host in hosts:
        out = host.load_sampler("cpu")(None, n=2, steps=3, seed=0, routing=dense)
        assert torch.equal(out.images, without.images)
    cached = {h: sorted(p.parent.parent.name for p in h.local_cache.folder.rglob("*.safetensors"))
              for h in hosts}
    assert cached[one] == cached[two] == ["a", "b", "c"]
    one.exclude("b")
    assert not (one.local_cache.folder / "b").exists()
    assert (two.local_cache.folder / "b").exists()  # host two has not looked yet
    assert two.refresh()
    assert not (two.local_cache.folder / "b").exists()
    assert sorted(p.name for p in two.local_cache.folder.iterdir()) == ["a", "c"]
