"""Contributor data: a folder per contributor, validated, loaded as tensors in [-1, 1].

Layout users have::

    DATA_DIR/<contributor_id>/*.png|*.jpg|*.jpeg|*.npy            unlabelled
    DATA_DIR/<contributor_id>/<label>/*.png                      labelled, a folder per label
    DATA_DIR/<contributor_id>/*.png + labels.csv                 labelled, flat (rows: file,label)

A label is an integer from 0 to MAX_LABEL (a digit's class, say). A labelled folder
must label every image: a file missing from labels.csv, a row naming no image, or a
label that is not such an integer is a DataError naming the file. A store is labelled
(its shards class-conditional) when its contributors' data is.

Any folder may carry captions (`captions.csv` or a `<image>.txt` per image; text.py):
a store whose contributors are all captioned is text-conditional unless told not to.

A contributor may state its licence in `licence.json` beside its images:
{"licence": "CC-BY-4.0", "attribution": "Twemoji by Twitter, CC-BY 4.0"} (an SPDX-like
name of at most 64 characters and the line its licence requires, at most 300); the
store records it, and every image drawn from the contributor carries that line.

All images of a data set share one size and channel count (1 = grayscale, 3 = RGB).
Files: `.png`, `.jpg`/`.jpeg` or `.npy` (one image each; `decode.py`).

The data hash (sha256 over sorted file names and bytes, and the captions where there
are) identifies exactly which bytes a shard was trained on; it is what the audit log of a forget names. Each file is
read once, and the bytes hashed are the bytes decoded.

Folders may come from an untrusted upload: files are read and decoded within the
limits of `decode.py` (bytes, pixels, files per folder). Error messages name at most
one file of a folder, never its listing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .decode import IMAGE_SUFFIXES, ImageLimits, read_file, read_images, read_table
from .errors import DataError, short
from .settings import CONTRIBUTOR_ID as CONTRIBUTOR_ID_PATTERN
from .settings import MAX_LABEL
from .text import read_captions

LABELS_CSV = "labels.csv"
LICENCE_JSON = "licence.json"
LABEL = re.compile(r"^[0-9]{1,3}$")
CONTRIBUTOR_ID = re.compile(CONTRIBUTOR_ID_PATTERN)


def validate_contributor_id(contributor_id: str) -> str:
    """Return `contributor_id` if it matches `[a-z0-9][a-z0-9_-]{0,63}`.

    Raises:
        DataError: naming the id, for anything else (path separators, dots, upper case).
    """
    if not isinstance(contributor_id, str) or not CONTRIBUTOR_ID.fullmatch(contributor_id):
        raise DataError(
            f"invalid contributor id {contributor_id!r}: "
            "must match [a-z0-9][a-z0-9_-]{0,63}"
        )
    return contributor_id


@dataclass(frozen=True)
class ContributorData:
    """One contributor's images as a float tensor (N, C, H, W) in [-1, 1], and their
    labels (N,) int64 for a labelled folder (else None)."""

    contributor_id: str
    images: torch.Tensor
    data_hash: str
    labels: torch.Tensor | None = None
    licence: dict | None = None  # {"licence", "attribution"} from licence.json
    captions: tuple[str, ...] | None = None  # one per image (text.py), or None

    def label_counts(self) -> dict[int, int]:
        """{label: images}, sorted by label; empty for unlabelled data."""
        if self.labels is None:
            return {}
        values, counts = torch.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.images.shape[0]



def image_files(folder: Path, max_images: int | None = None) -> list[Path]:
    """The image files directly inside `folder`, sorted by name.

    Args:
        max_images: at most this many (default: CDM_MAX_IMAGES); counted while listing,
            so a huge folder is refused before it is sorted or read.

    Raises:
        DataError: naming the folder and the limit, for more image files than that;
            naming the file, for a symbolic link (a data folder holds its files itself).
        ValueError: a bad CDM_MAX_IMAGES, when `max_images` is not given.
    """
    limit = ImageLimits.from_env().max_images if max_images is None else max_images
    files = []
    for path in folder.iterdir():
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_symlink():
            raise DataError(f"{folder.name}/{short(path.name, 64)} is a symbolic link; a data "
                            "folder must hold its files itself")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            files.append(path)
            if len(files) > limit:
                raise DataError(f"{folder} holds more than {limit} image files, the limit "
                                "(CDM_MAX_IMAGES)")
    return sorted(files)


def hash_files(files: list[Path]) -> str:
    """sha256 over (name, bytes) of each file, in the given order (what
    `ContributorData.data_hash` is; loading computes it from the bytes it decoded)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def parse_label(text: object, what: str) -> int:
    """A label from a folder name or a labels.csv cell.

    Raises:
        DataError: prefixed with `what`, unless `text` is an integer 0..MAX_LABEL.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)) or not LABEL.match(str(text)):
        raise DataError(f"{what}: label {short(text, 40)!r} is not an integer from 0 to {MAX_LABEL}")
    return int(text)


def _labels_csv(path: Path, who: str, max_bytes: int) -> dict[str, int]:
    """file name -> label from a labels.csv (rows `file,label`, an optional header)."""
    return {name: parse_label(label.strip(), f"{who}: {LABELS_CSV} row {number} ({short(name, 64)})")
            for number, name, label in read_table(path, who, max_bytes, "label")}


def scan_folder(folder: Path, who: str, limits: ImageLimits) -> tuple[list[Path], list[int] | None]:
    """The image files of a folder and their labels (None when it is unlabelled): one
    sub-folder per label, or flat files with a labels.csv, or flat files alone.

    Raises:
        DataError: images beside label folders, a bad label folder name, a file without
            a label or a labels.csv row without a file, too many image files, a label
            folder or an image that is a symbolic link.
    """
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for d in subdirs:
        if d.is_symlink():
            raise DataError(f"{who}: folder {short(d.name, 40)}/ is a symbolic link; a data "
                            "folder must hold its files itself")
    flat = image_files(folder, limits.max_images)
    if subdirs:
        if flat:
            raise DataError(f"{who}: {flat[0].name} lies beside label folders "
                            f"({subdirs[0].name}/); put every image in a <label>/ folder")
        labelled = sorted(((parse_label(d.name, f"{who}: folder {short(d.name, 40)}/"), d)
                           for d in subdirs), key=lambda pair: pair[0])
        files: list[Path] = []
        labels: list[int] = []
        for label, d in labelled:
            found = image_files(d, limits.max_images - len(files))
            files += found
            labels += [label] * len(found)
        return files, labels
    table = folder / LABELS_CSV
    if not table.is_file():
        return flat, None
    mapping = _labels_csv(table, who, limits.max_bytes)
    names = {f.name for f in flat}
    for f in flat:
        if f.name not in mapping:
            raise DataError(f"{who}: {f.name} has no label in {LABELS_CSV} (rows: file,label)")
    extra = sorted(set(mapping) - names)
    if extra:
        raise DataError(f"{who}: {LABELS_CSV} labels {short(extra[0], 64)}, which is not an "
                        "image file of the folder")
    return flat, [mapping[f.name] for f in flat]


def load_contributor(folder: str | Path, contributor_id: str | None = None,
                     limits: ImageLimits | None = None,
                     shape: tuple[int, int, int] | None = None) -> ContributorData:
    """Load and validate one contributor folder (labelled or not: module docstring).

    Args:
        folder: a directory holding the contributor's images.
        contributor_id: defaults to the folder's name.
        limits: bounds on files, bytes and pixels; default `ImageLimits.from_env()`.
        shape: the (C, H, W) a store expects; each image's size is checked against it
            from its header, before it is decoded (an add to a store).

    Raises:
        DataError: bad id, missing or empty folder, too many image files, a file too
            large or of too many pixels, unreadable file, mixed shapes, a missing or
            bad label or caption.
        ValueError: a bad CDM_MAX_IMAGE* variable, when `limits` is not given.
    """
    folder = Path(folder)
    contributor_id = validate_contributor_id(contributor_id or folder.name)
    limits = limits or ImageLimits.from_env()
    if not folder.is_dir():
        raise DataError(f"contributor {contributor_id!r}: {folder} is not a directory")
    who = f"contributor {contributor_id!r}"
    files, labels = scan_folder(folder, who, limits)
    if not files:
        raise DataError(
            f"{who}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}"
        )
    licence = read_licence(folder, who, limits.max_bytes)
    captions = read_captions(folder, files, who, limits.max_bytes)
    images, data_hash = read_images(files, who, limits, labels, shape)
    if captions is not None:  # the captions are data the shard learns from too
        data_hash = hashlib.sha256("\0".join([data_hash, *captions]).encode()).hexdigest()
    return ContributorData(contributor_id, images, data_hash,
                           None if labels is None else torch.tensor(labels, dtype=torch.long),
                           licence, None if captions is None else tuple(captions))


def read_licence(folder: Path, who: str, max_bytes: int) -> dict | None:
    """The contributor's `licence.json` (module docstring), or None without one.

    Raises:
        DataError: naming the file, for anything but an object with a string
            "licence" (1-64 characters) and "attribution" (1-300), and no other key.
    """
    path = folder / LICENCE_JSON
    if not path.exists() and not path.is_symlink():
        return None
    try:
        value = json.loads(read_file(path, who, max_bytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        value = None
    ok = (isinstance(value, dict) and set(value) == {"licence", "attribution"}
          and all(isinstance(value[k], str) and value[k].strip() for k in value)
          and len(value["licence"]) <= 64 and len(value["attribution"]) <= 300)
    if not ok:
        raise DataError(f"{who}: {LICENCE_JSON} must be a JSON object "
                        '{"licence": "<at most 64 characters>", "attribution": "<at most 300>"}')
    return {"licence": value["licence"].strip(), "attribution": value["attribution"].strip()}


def load_contributors(data_dir: str | Path,
                      limits: ImageLimits | None = None) -> list[ContributorData]:
    """Load every `DATA_DIR/<contributor_id>/` folder, sorted by id.

    Raises:
        DataError: no contributor folders, images directly in `data_dir` (the first
            one found is named), or any folder fails `load_contributor`, or the
            contributors' image shapes differ.
        ValueError: a bad CDM_MAX_IMAGE* variable, when `limits` is not given.
    """
    data_dir = Path(data_dir)
    limits = limits or ImageLimits.from_env()
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    folders = []
    for path in data_dir.iterdir():
        if path.is_dir():
            folders.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            raise DataError(
                f"{data_dir} holds images directly ({path.name}, ...); expected one folder "
                "per contributor: DATA_DIR/<contributor_id>/*.png"
            )
    if not folders:
        raise DataError(f"{data_dir} has no contributor folders")
    datasets = [load_contributor(p, limits=limits) for p in sorted(folders)]
    check_same_shape(datasets)
    check_same_labelling(datasets)
    return datasets


def check_same_labelling(datasets: list[ContributorData], labelled: bool | None = None) -> None:
    """Raise DataError naming the first contributor whose data is labelled where the
    others' (or the store's, `labelled`) is not, or the reverse."""
    if labelled is None:
        labelled = datasets[0].labels is not None
    for data in datasets:
        if (data.labels is not None) != labelled:
            state = "labelled" if data.labels is not None else "unlabelled"
            want = "labelled (a <label>/ folder per label or a labels.csv)" if labelled else "unlabelled"
            whose = "the store is" if len(datasets) == 1 else "the others are"
            raise DataError(f"contributor {data.contributor_id!r} is {state}, but {whose} {want}")


def check_same_shape(datasets: list[ContributorData], shape: tuple | None = None) -> None:
    """Raise DataError naming the first contributor whose image shape differs."""
    shape = tuple(shape) if shape is not None else datasets[0].image_shape
    for data in datasets:
        if data.image_shape != shape:
            raise DataError(
                f"contributor {data.contributor_id!r} has images of shape "
                f"{data.image_shape} (C, H, W), expected {shape}"
            )


def load_image_folder(folder: str | Path, limits: ImageLimits | None = None) -> torch.Tensor:
    """Images of a plain folder (e.g. the public split) as (N, C, H, W) in [-1, 1],
    labelled or not (labels dropped).

    Raises:
        DataError: missing or empty folder, or as `load_contributor` for its files.
        ValueError: a bad CDM_MAX_IMAGE* variable, when `limits` is not given.
    """
    return load_labelled_folder(folder, limits)[0]


def load_labelled_folder(folder: str | Path, limits: ImageLimits | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images of a plain folder and their labels (None if it is unlabelled), laid out
    as a contributor folder is (module docstring).

    Raises:
        DataError: as `load_image_folder`, or a missing or bad label.
    """
    folder = Path(folder)
    limits = limits or ImageLimits.from_env()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory")
    files, labels = scan_folder(folder, str(folder), limits)
    if not files:
        raise DataError(f"no images in {folder}")
    images = read_images(files, str(folder), limits, labels)[0]
    return images, None if labels is None else torch.tensor(labels, dtype=torch.long)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    arr = ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()
