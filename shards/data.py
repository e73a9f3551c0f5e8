"""Contributor data: a folder per contributor, validated, loaded as tensors in [-1, 1].

Layout users have::

    DATA_DIR/<contributor_id>/*.png|*.jpg|*.jpeg|*.npy

All images of a data set share one size and channel count (1 = grayscale, 3 = RGB).
A `.npy` file holds one image, shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3},
either uint8 in [0, 255] or floats in [0, 1].

The data hash (sha256 over sorted file names and bytes) identifies exactly which
bytes a shard was trained on; it is what the audit log of a forget names.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

CONTRIBUTOR_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


def validate_contributor_id(contributor_id: str) -> str:
    """Return `contributor_id` if it matches `[a-z0-9][a-z0-9_-]{0,63}`.

    Raises:
        DataError: naming the id, for anything else (path separators, dots, upper case).
    """
    if not isinstance(contributor_id, str) or not CONTRIBUTOR_ID.match(contributor_id):
        raise DataError(
            f"invalid contributor id {contributor_id!r}: "
            "must match [a-z0-9][a-z0-9_-]{0,63}"
        )
    return contributor_id


@dataclass(frozen=True)
class ContributorData:
    """One contributor's images as a float tensor (N, C, H, W) in [-1, 1]."""

    contributor_id: str
    images: torch.Tensor
    data_hash: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.images.shape[0]


def _read_image(path: Path) -> np.ndarray:
    """Read one file as float32 (C, H, W) in [0, 1]."""
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                img.load()
                if img.mode not in ("L", "RGB"):
                    if img.mode in ("1", "P", "I;16", "I"):
                        img = img.convert("L")
                    elif img.mode in ("RGBA", "LA", "CMYK", "YCbCr"):
                        img = img.convert("RGB" if img.mode != "LA" else "L")
                arr = np.asarray(img)
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise DataError(f"unreadable image file {path}: {err}") from err
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] not in (1, 3):
        arr = np.moveaxis(arr, -1, 0)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise DataError(
            f"{path}: image shape {arr.shape} is not (H, W), (H, W, C) or (C, H, W) "
            "with C in {1, 3}"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise DataError(f"{path}: float images must be finite and in [0, 1]")
        return arr.astype(np.float32)
    raise DataError(f"{path}: dtype {arr.dtype} is not uint8 or float")


def _read_images(files: list[Path], who: str) -> torch.Tensor:
    """Read `files` as one (N, C, H, W) tensor in [-1, 1]; `who` prefixes errors.

    Raises:
        DataError: naming the first file whose shape differs from the first file's.
    """
    arrays = []
    for path in files:
        arr = _read_image(path)
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(
                f"{who}: {path.name} has shape {arr.shape}, "
                f"but {files[0].name} has {arrays[0].shape}; all images must match"
            )
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)) * 2.0 - 1.0


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def hash_files(files: list[Path]) -> str:
    """sha256 over (name, bytes) of each file, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_contributor(folder: str | Path, contributor_id: str | None = None) -> ContributorData:
    """Load and validate one contributor folder.

    Args:
        folder: a directory holding the contributor's images.
        contributor_id: defaults to the folder's name.

    Raises:
        DataError: bad id, missing or empty folder, unreadable file, mixed shapes.
    """
    folder = Path(folder)
    contributor_id = validate_contributor_id(contributor_id or folder.name)
    if not folder.is_dir():
        raise DataError(f"contributor {contributor_id!r}: {folder} is not a directory")
    files = image_files(folder)
    if not files:
        raise DataError(
            f"contributor {contributor_id!r}: no images ({', '.join(IMAGE_SUFFIXES)}) "
            f"in {folder}"
        )
    images = _read_images(files, f"contributor {contributor_id!r}")
    return ContributorData(contributor_id, images, hash_files(files))


def load_contributors(data_dir: str | Path) -> list[ContributorData]:
    """Load every `DATA_DIR/<contributor_id>/` folder, sorted by id.

    Raises:
        DataError: no contributor folders, or any folder fails `load_contributor`, or
            the contributors' image shapes differ.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir())
    stray = [p.name for p in data_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        raise DataError(
            f"{data_dir} holds images directly ({stray[0]}, ...); expected one folder "
            "per contributor: DATA_DIR/<contributor_id>/*.png"
        )
    if not folders:
        raise DataError(f"{data_dir} has no contributor folders")
    datasets = [load_contributor(p) for p in folders]
    check_same_shape(datasets)
    return datasets


def check_same_shape(datasets: list[ContributorData], shape: tuple | None = None) -> None:
    """Raise DataError naming the first contributor whose image shape differs."""
    shape = tuple(shape) if shape is not None else datasets[0].image_shape
    for data in datasets:
        if data.image_shape != shape:
            raise DataError(
                f"contributor {data.contributor_id!r} has images of shape "
                f"{data.image_shape} (C, H, W), expected {shape}"
            )


def load_image_folder(folder: str | Path) -> torch.Tensor:
    """Images of a plain folder (e.g. the public split) as (N, C, H, W) in [-1, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory")
    files = image_files(folder)
    if not files:
        raise DataError(f"no images in {folder}")
    return _read_images(files, str(folder))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    arr = ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()
