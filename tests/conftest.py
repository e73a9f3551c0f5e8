"""Shared fixtures: tiny seeded data and stores (a few training steps each)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# the shard bank's split of a step fixed, not chosen by timing (shards/passcost.py):
# golden values and bitwise comparisons across processes stay exact; tests/test_passcost.py
# tests the measured split
os.environ.setdefault("CDM_SOLO_ROWS", "32")


def _own_cpus() -> None:
    """Under pytest-xdist (`make test` runs two workers), give each worker its share of
    this process's CPUs (one core each on two): the worker and everything it starts
    (servers, their BentoML workers, the CLI, Chromium, Postgres) inherit the affinity,
    and torch's thread pools size themselves by it (service/app.py reads it too), so
    the two workers never spin-wait on each other's cores (two torch jobs sharing two
    cores run 20-50x slower). Runs before torch is imported: OpenMP reads the
    affinity when it loads."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus, count, i = sorted(os.sched_getaffinity(0)), int(count), int(worker.removeprefix("gw"))
    if count > 1:  # more workers than CPUs: several on one, each on one thread
        os.sched_setaffinity(0, cpus[i % count::count] if len(cpus) >= count
                             else [cpus[i % len(cpus)]])


_own_cpus()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from shards import ShardStore, StoreConfig, TrainConfig, load_contributors  # noqa: E402
from shards.data import load_image_folder  # noqa: E402

TINY = TrainConfig(steps=12, batch_size=8, warmup_steps=2)
TINY_CONFIG = StoreConfig(shard_train=TINY, base_train=TINY, lora_train=TINY,
                          classifier_train=TINY, classifier_update_steps=4, head_train=TINY)
TINY_JOINT = StoreConfig(shard_train=TINY, base_train=TINY, lora_train=TINY,
                         classifier_train=TINY, classifier_update_steps=4, router="joint")


def write_pngs(folder, images, mode="L"):
    """Write uint8 arrays (N, H, W[, 3]) as PNGs into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img, mode=mode).save(folder / f"img-{i:03d}.png")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Three contributors of 8x8 grayscale digits: a={0}, b={1}, c={2}; plus public."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("data")
    imgs = np.round(digits.images / 16 * 255).astype(np.uint8)
    for cid, digit in [("a", 0), ("b", 1), ("c", 2)]:
        write_pngs(root / "contributors" / cid, imgs[digits.target == digit][:20])
    write_pngs(root / "public", imgs[digits.target >= 3][:30])
    return root


@pytest.fixture(scope="session")
def heldout(tmp_path_factory):
    """Held-out digits, 12 per class, in heldout/<digit>/ (for the valuation evaluator)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("heldout")
    imgs = np.round(digits.images / 16 * 255).astype(np.uint8)
    for d in range(10):
        write_pngs(root / str(d), imgs[digits.target == d][-12:])
    return root


@pytest.fixture(scope="session")
def datasets(data_dir):
    return load_contributors(data_dir / "contributors")


@pytest.fixture(scope="session")
def public(data_dir):
    return load_image_folder(data_dir / "public")


@pytest.fixture(scope="session")
def full_store(tmp_path_factory, datasets, public):
    """Full shards, router `heads` (the default)."""
    return ShardStore.create(tmp_path_factory.mktemp("s") / "full", datasets, TINY_CONFIG,
                             public=public, device="cpu", progress=False)


@pytest.fixture(scope="session")
def joint_store(tmp_path_factory, datasets):
    """Full shards, router `joint` (one classifier on everyone's kept data)."""
    return ShardStore.create(tmp_path_factory.mktemp("s") / "joint", datasets, TINY_JOINT,
                             device="cpu", progress=False)


@pytest.fixture(scope="session")
def lora_store(tmp_path_factory, datasets, public):

    return ShardStore.create(tmp_path_factory.mktemp("s") / "lora", datasets,
                             TINY_CONFIG.replace(kind="lora"), public=public, device="cpu",
                             progress=False)


@pytest.fixture()
def tiny_config():
    return TINY_CONFIG


def assert_close(a: torch.Tensor, b: torch.Tensor, atol=1e-5):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol), f"max diff {(a - b).abs().max().item()}"


@pytest.fixture()
def store_copy(full_store, tmp_path):
    """A private, mutable copy of the tiny full store."""
    import shutil

    shutil.copytree(full_store.root, tmp_path / "store")
    return ShardStore.open(tmp_path / "store")


@pytest.fixture()
def joint_copy(joint_store, tmp_path):
    """A private, mutable copy of the tiny joint-router store (contributor data kept)."""
    import shutil

    shutil.copytree(joint_store.root, tmp_path / "joint")
    return ShardStore.open(tmp_path / "joint")


def wait_for_job(get_job, timeout=120.0):
    """Poll `get_job()` until the job has finished; return it."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job still {job['status']} after {timeout}s")


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL server for the session (service/testing.py)."""
    from service.testing import PostgresCluster

    cluster = PostgresCluster()
    yield cluster
    cluster.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, monkeypatch):
    """Run the test on each database engine: the SQLite file in the store (the
    default) and a fresh Postgres database named by CDM_DATABASE_URL."""
    if request.param == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        url = cluster.database()
        monkeypatch.setenv("CDM_DATABASE_URL", url)
        yield url
        cluster.drop(url)
    else:
        yield None


def pytest_collection_modifyitems(items):
    """Every test not marked `integration` is a unit test (`make test-fast`). Files
    with integration tests (servers, browsers, crash injection: minutes each) run
    first, each file's tests in their order: `make test`'s two workers take whole files
    (`--dist loadfile`) as they come free, and the many short unit files fill in at
    the end instead of one worker finishing a long file alone."""
    slow = set()
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)
        else:
            slow.add(item.path)
    items.sort(key=lambda item: item.path not in slow)
