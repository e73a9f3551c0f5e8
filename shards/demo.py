"""The embedded default data set, written as real PNG folders from scikit-learn's
bundled 8x8 digits (no download).

Every folder is labelled by digit (`<digit>/*.png`), so stores trained on it are
class-conditional. Split, per digit class, by a seeded shuffle:
  * 25% `heldout/<digit>/`  evaluation only, owned by nobody (labelled);
  * 15% `public/`           public data, owned by nobody (base model of LoRA shards);
  * 8 images a class        `mallory`, the planted low-quality contributor, whose
                            images are heavily corrupted (noise + pixel dropout);
  * the rest ("owned")      by default the owners in OWNERS below; 8 and 9 are split
                            between `erin` and `frank`, the overlapping pair.

With `contributors=N` the held-out, public and `mallory` images are exactly the default
ones, and the owned images go to N - 1 honest contributors `c000`, `c001`, ... instead:
the ten digits are laid out in a seeded random order as one chain of per-digit blocks,
and the chain is cut into N - 1 consecutive segments of seeded random length (about
equal on average), each of at least MIN_IMAGES images and touching at most MAX_CLASSES
digit blocks; segments are then given ids in a seeded random order. So every honest
contributor holds one to three digits, every digit is held by at least one, and a
digit's images are split disjointly among its holders (neighbours in the chain).
N ranges from MIN_CONTRIBUTORS (four honest contributors of at most three digits cover
the ten) to `max_contributors()` (owned images // MIN_IMAGES, plus `mallory`).
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .files import building

OWNERS: dict[str, list[int]] = {
    "alice": [0, 1],
    "bob": [2, 3],
    "carol": [4, 5],
    "dave": [6, 7],
    "erin": [8, 9],
    "frank": [8, 9],
}
LOW_QUALITY = "mallory"
HELDOUT_FRACTION = 0.25
PUBLIC_FRACTION = 0.15
LOW_QUALITY_PER_CLASS = 8
MIN_IMAGES = 4  # per contributor, in the N-split
MAX_CLASSES = 3  # digits per honest contributor, in the N-split
N_CLASSES = 10
MIN_CONTRIBUTORS = -(-N_CLASSES // MAX_CLASSES) + 1  # 4 honest + mallory = 5


def _corrupt(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heavy corruption in [0, 1]: Gaussian noise (std 0.45) and 40% pixel dropout."""
    noisy = images + rng.normal(0.0, 0.45, size=images.shape)
    noisy[rng.random(images.shape) < 0.4] = rng.random()
    return np.clip(noisy, 0.0, 1.0)


def write_pngs(folder: Path, prefix: str, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        pixels = np.round(img * 255.0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{prefix}-{i:04d}.png")


def write_labelled(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """`folder/<digit>/<prefix>-<i>.png`, i counting over the whole set."""
    for digit in np.unique(labels):
        idx = np.flatnonzero(labels == digit)
        sub = folder / str(int(digit))
        sub.mkdir(parents=True, exist_ok=True)
        for i in idx:
            pixels = np.round(images[i] * 255.0).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(sub / f"{prefix}-{i:04d}.png")


def split_sizes(n: int) -> tuple[int, int, int]:
    """(held out, public, low quality) image counts of a class of `n` images."""
    n_held = int(round(HELDOUT_FRACTION * n))
    n_pub = int(round(PUBLIC_FRACTION * n))
    return n_held, n_pub, min(LOW_QUALITY_PER_CLASS, max(0, n - n_held - n_pub))


def max_contributors() -> int:
    """The largest `contributors=N` the bundled digits allow: every honest contributor
    needs MIN_IMAGES owned images; `mallory` is the N-th."""
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target, minlength=N_CLASSES)
    owned = sum(int(n) - sum(split_sizes(int(n))) for n in counts)
    return owned // MIN_IMAGES + 1


def _check_contributors(contributors: object) -> int | None:
    if contributors is None:
        return None
    top = max_contributors()
    allowed = f"None (the default owners) or an int from {MIN_CONTRIBUTORS} to {top}"
    if isinstance(contributors, bool) or not isinstance(contributors, numbers.Integral):
        raise DataError(f"contributors={contributors!r} is not an int; allowed: {allowed}")
    n = int(contributors)
    if n < MIN_CONTRIBUTORS:
        raise DataError(f"contributors={n} is too small: {N_CLASSES} digits need "
                        f"{MIN_CONTRIBUTORS - 1} honest contributors of at most "
                        f"{MAX_CLASSES} digits plus {LOW_QUALITY}; allowed: {allowed}")
    if n > top:
        raise DataError(f"contributors={n} is too many: the digits allow at most {top} "
                        f"(each contributor needs {MIN_IMAGES} images); allowed: {allowed}")
    return n


def write_demo_data(out_dir: str | Path, seed: int = 0, contributors: int | None = None) -> dict:
    """Write the default data set under `out_dir` and return its ownership table.

    Layout: `contributors/<id>/*.png`, `public/*.png`, `heldout/<digit>/*.png`,
    `owners.json` (the returned table). Written to a sibling temp folder and renamed,
    so `out_dir` is either complete or absent. `contributors=N` splits the owned images
    among N - 1 honest contributors plus `mallory` (module docstring); the table then
    also records `contributors_requested`.

    Raises:
        DataError: `out_dir` exists and is not empty; `contributors` is not None or an
            int from MIN_CONTRIBUTORS to `max_contributors()`.
    """
    n = _check_contributors(contributors)
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()):
        raise DataError(f"{final} exists and is not empty")
    with building(final) as out_dir:
        table = _write(out_dir, seed, n)
    return table


def _write(out_dir: Path, seed: int, n: int | None) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = digits.target
    rng = np.random.default_rng(seed)
    low_quality, public, owned, heldout_counts = [], [], [], {}
    low_labels, public_labels = [], []
    for digit in range(N_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_held, n_pub, n_low = split_sizes(len(idx))
        held, idx = idx[:n_held], idx[n_held:]
        pub, idx = idx[:n_pub], idx[n_pub:]
        low, idx = idx[:n_low], idx[n_low:]
        write_pngs(out_dir / "heldout" / str(digit), f"heldout-{digit}", images[held])
        heldout_counts[digit] = len(held)
        public.append(images[pub])
        public_labels.append(np.full(len(pub), digit))
        low_quality.append(_corrupt(images[low], rng))
        low_labels.append(np.full(len(low), digit))
        owned.append(images[idx])
    write_labelled(out_dir / "public", "public", np.concatenate(public), np.concatenate(public_labels))
    if n is None:
        honest = _default_owners(owned)
    else:
        honest = _split_owners(owned, n - 1, rng)
    table = {"seed": seed, "contributors": {}, "public_images": int(sum(map(len, public))),
             "heldout_images": heldout_counts}
    everyone = {**honest, LOW_QUALITY: (list(range(N_CLASSES)), np.concatenate(low_quality),
                                        np.concatenate(low_labels))}
    for cid, (classes, imgs, labs) in everyone.items():
        write_labelled(out_dir / "contributors" / cid, cid, imgs, labs)
        table["contributors"][cid] = {
            "classes": classes,
            "images": int(len(imgs)),
            "corrupted": cid == LOW_QUALITY,
        }
    if n is not None:
        table["contributors_requested"] = n
    (out_dir / "owners.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def _default_owners(owned: list[np.ndarray]) -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
    """OWNERS' classes, images and labels: a class shared by several owners is split
    evenly."""
    parts: dict[str, list[np.ndarray]] = {cid: [] for cid in OWNERS}
    labels: dict[str, list[np.ndarray]] = {cid: [] for cid in OWNERS}
    for digit, imgs in enumerate(owned):
        holders = [cid for cid, classes in OWNERS.items() if digit in classes]
        for k, part in enumerate(np.array_split(np.arange(len(imgs)), len(holders))):
            parts[holders[k]].append(imgs[part])
            labels[holders[k]].append(np.full(len(part), digit))
    return {cid: (OWNERS[cid], np.concatenate(parts[cid]), np.concatenate(labels[cid]))
            for cid in OWNERS}


def _split_owners(owned: list[np.ndarray], n_honest: int,
                  rng: np.random.Generator) -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
    """`n_honest` contributors `c000`, ...: consecutive segments of the owned images laid
    out digit by digit in a seeded random order (module docstring)."""
    order = rng.permutation(N_CLASSES)
    pool = np.concatenate([owned[d] for d in order])
    pool_labels = np.concatenate([np.full(len(owned[d]), d) for d in order])
    cuts = _chain_cuts([len(owned[d]) for d in order], n_honest, rng)
    width = 3 if n_honest < 1000 else 4
    ids = [f"c{i:0{width}d}" for i in range(n_honest)]
    segment_of = rng.permutation(n_honest)  # id i holds segment segment_of[i]
    result = {}
    for cid, s in zip(ids, segment_of, strict=True):
        lo, hi = cuts[s], cuts[s + 1]
        result[cid] = (sorted({int(d) for d in pool_labels[lo:hi]}), pool[lo:hi], pool_labels[lo:hi])
    return result


def _chain_cuts(block_sizes: list[int], n_parts: int, rng: np.random.Generator) -> list[int]:
    """Cut points 0 = p_0 < ... < p_n = total of a chain of blocks into `n_parts`
    segments, each of at least MIN_IMAGES items touching at most MAX_CLASSES blocks.

    Invariant before each cut at q with k parts left: total - q >= MIN_IMAGES * k and the
    blocks from q's on number at most MAX_CLASSES * k; every cut keeps it (each block
    holds at least 2 items), so any 4 <= n_parts <= total // MIN_IMAGES succeeds.
    """
    ends = np.cumsum(block_sizes)
    starts = ends - np.asarray(block_sizes)
    total, n_blocks = int(ends[-1]), len(block_sizes)
    cuts = [0]
    for k in range(n_parts, 1, -1):  # k parts left, this one included
        q = cuts[-1]
        block = int(np.searchsorted(ends, q, side="right"))  # the block holding item q
        first_rest = n_blocks - MAX_CLASSES * (k - 1)  # the rest may start no earlier
        lo = max(MIN_IMAGES, int(starts[first_rest]) - q if first_rest > 0 else 0)
        hi = min(total - MIN_IMAGES * (k - 1),
                 int(ends[min(block + MAX_CLASSES - 1, n_blocks - 1)])) - q
        target = int(round((total - q) / k * rng.uniform(0.5, 1.5)))
        cuts.append(q + min(max(target, lo), hi))
    cuts.append(total)
    return cuts
