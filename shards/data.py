"""Contributor data: a folder per contributor, validated, loaded as tensors in [-1, 1].

Layout users have::

    DATA_DIR/<contributor_id>/*.png|*.jpg|*.jpeg|*.npy            unlabelled
    DATA_DIR/<contributor_id>/<label>/*.png                      labelled, a folder per label
    DATA_DIR/<contributor_id>/*.png + labels.csv                 labelled, flat (rows: file,label)

A label is an integer from 0 to MAX_LABEL (a digit's class, say). A labelled folder
must label every image: a file missing from labels.csv, a row naming no image, or a
label that is not such an integer is a DataError naming the file. A store is labelled
(its shards class-conditional) when its contributors' data is.

All images of a data set share one size and channel count (1 = grayscale, 3 = RGB).
A `.npy` file holds one image, shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3},
either uint8 in [0, 255] or floats in [0, 1].

The data hash (sha256 over sorted file names and bytes) identifies exactly which
bytes a shard was trained on; it is what the audit log of a forget names. Each file is
read once, and the bytes hashed are the bytes decoded.

Limits (folders may come from an untrusted upload, and a small PNG can decode to
gigabytes): a file larger than CDM_MAX_IMAGE_BYTES (default 1 MiB) is not read; an
image whose header claims more than CDM_MAX_IMAGE_PIXELS pixels (default 512 x 512)
is not decoded; a folder with more than CDM_MAX_IMAGES image files (default 100000) is
not loaded. A `.png` must hold a PNG and a `.jpg`/`.jpeg` a JPEG (no other decoder of
PIL runs). Error messages name at most one file of a folder, never its listing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError, short

LABELS_CSV = "labels.csv"
MAX_LABEL = 999
LABEL = re.compile(r"^[0-9]{1,3}$")
CONTRIBUTOR_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}

MAX_IMAGE_BYTES_ENV = "CDM_MAX_IMAGE_BYTES"
MAX_IMAGE_PIXELS_ENV = "CDM_MAX_IMAGE_PIXELS"
MAX_IMAGES_ENV = "CDM_MAX_IMAGES"
# (default, smallest, largest) of each limit. The pixel limit stays below PIL's own
# MAX_IMAGE_PIXELS (89478485), so an image PIL would warn about is rejected by ours.
LIMIT_RANGES = {
    MAX_IMAGE_BYTES_ENV: (1 << 20, 1, 1 << 30),
    MAX_IMAGE_PIXELS_ENV: (512 * 512, 1, 1 << 26),
    MAX_IMAGES_ENV: (100_000, 1, 10_000_000),
}
# what a broken file can make PIL's or numpy's readers raise (besides DataError's own)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                  struct.error, zlib.error)


def _env_limit(name: str) -> int:
    """The integer in environment variable `name`, or its default when unset.

    Raises:
        ValueError: naming the variable and its allowed range, for a value that is not
            an integer in that range (an empty value included).
    """
    default, low, high = LIMIT_RANGES[name]
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ValueError(f"{name}={raw[:40]!r} must be an integer in [{low}, {high}]")
    return value


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what loading a folder may read and decode (see the module docstring)."""

    max_bytes: int = LIMIT_RANGES[MAX_IMAGE_BYTES_ENV][0]
    max_pixels: int = LIMIT_RANGES[MAX_IMAGE_PIXELS_ENV][0]
    max_images: int = LIMIT_RANGES[MAX_IMAGES_ENV][0]

    def __post_init__(self):
        """Check each limit against its variable's allowed range.

        Raises:
            ValueError: naming the field, its variable and its allowed range.
        """
        fields = (("max_bytes", MAX_IMAGE_BYTES_ENV), ("max_pixels", MAX_IMAGE_PIXELS_ENV),
                  ("max_images", MAX_IMAGES_ENV))
        for field, env in fields:
            _, low, high = LIMIT_RANGES[env]
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{field}={value!r} ({env}) must be an integer in [{low}, {high}]")

    @classmethod
    def from_env(cls) -> ImageLimits:
        """The limits in CDM_MAX_IMAGE_BYTES, CDM_MAX_IMAGE_PIXELS and CDM_MAX_IMAGES,
        read now (so a changed environment applies to the next load).

        Raises:
            ValueError: naming the variable and its allowed range, for a bad value.
        """
        return cls(_env_limit(MAX_IMAGE_BYTES_ENV), _env_limit(MAX_IMAGE_PIXELS_ENV),
                   _env_limit(MAX_IMAGES_ENV))


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


def _reason(err: BaseException, path: Path) -> str:
    """`err`'s message with `path` shortened to its file name (no server paths)."""
    return str(err).replace(str(path), path.name)


def _read_file(path: Path, who: str, max_bytes: int) -> bytes:
    """The bytes of regular file `path`, read once and at most `max_bytes` of them.

    The size is checked on the open file (a name swapped for a FIFO or a device after
    listing is refused, not read) and again on what was read (a file that grew, or a
    /proc-like file reporting size 0, cannot slip past the limit).

    Raises:
        DataError: naming the file and the limit, for a file too large, not regular or
            unreadable.
    """
    too_large = (f"{who}: {path.name} is larger than the limit of {max_bytes} bytes "
                 f"({MAX_IMAGE_BYTES_ENV})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise DataError(f"{who}: {path.name} is not a regular file")
            if info.st_size > max_bytes:
                raise DataError(f"{too_large}: it has {info.st_size} bytes")
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise DataError(f"{who}: unreadable image file {path.name}: {_reason(err, path)}") from err
    if len(data) > max_bytes:
        raise DataError(too_large)
    return data


def _npy_pixels(shape: tuple[int, ...]) -> int:
    """Pixels (H x W) of an array of `shape`, read the way `_to_chw` reads it."""
    if len(shape) == 3:
        if shape[-1] in (1, 3) and shape[0] not in (1, 3):
            return shape[0] * shape[1]
        return shape[1] * shape[2]
    return math.prod(shape)


def _decode_npy(name: str, data: bytes, who: str, limits: ImageLimits) -> np.ndarray:
    """One `.npy` file's array, after its header was checked against the data's length
    and the pixel limit (numpy would otherwise allocate whatever the header claims)."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise DataError(f"{who}: {name}: unsupported .npy format version {version}")
    if dtype.hasobject:
        raise DataError(f"{who}: {name}: object arrays are not images")
    if math.prod(shape) * dtype.itemsize != len(data) - buf.tell():
        raise DataError(f"{who}: {name}: the array's size does not match its .npy header")
    pixels = _npy_pixels(shape)
    if pixels > limits.max_pixels:
        raise DataError(f"{who}: {name} has {pixels} pixels, more than the limit of "
                        f"{limits.max_pixels} ({MAX_IMAGE_PIXELS_ENV})")
    buf.seek(0)
    return np.load(buf, allow_pickle=False)


def _decode_pil(name: str, fmt: str, data: bytes, who: str, limits: ImageLimits) -> np.ndarray:
    """One PNG or JPEG as an array; its size is checked from the header PIL reads at
    `Image.open`, before `load` decodes (and allocates) the pixels."""
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise DataError(
                    f"{who}: {name} is {width}x{height} = {width * height} pixels, more than "
                    f"the limit of {limits.max_pixels} ({MAX_IMAGE_PIXELS_ENV})")
            img.load()
            if img.mode not in ("L", "RGB"):
                if img.mode in ("1", "P", "I;16", "I"):
                    img = img.convert("L")
                elif img.mode in ("RGBA", "LA", "CMYK", "YCbCr"):
                    img = img.convert("RGB" if img.mode != "LA" else "L")
            return np.asarray(img)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's own bound (hit when PIL's limit is below ours, or with -W error)
        raise DataError(f"{who}: {name} exceeds the pixel limit of {limits.max_pixels} "
                        f"({MAX_IMAGE_PIXELS_ENV}): {err}") from err
    except UnidentifiedImageError as err:
        raise DataError(f"{who}: unreadable image file {name}: not a {fmt} image") from err


def _read_image(path: Path, who: str, limits: ImageLimits) -> tuple[bytes, np.ndarray]:
    """Read one file (bounded), decode it; returns its bytes and float32 (C, H, W) in
    [0, 1].

    Raises:
        DataError: naming the file (by name, not full path) and the limit it broke, for
            a file too large, too many pixels, not the format its suffix names,
            truncated or otherwise unreadable, or of a shape or dtype that is no image.
    """
    data = _read_file(path, who, limits.max_bytes)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = _decode_npy(path.name, data, who, limits)
        else:
            arr = _decode_pil(path.name, PIL_FORMATS[suffix], data, who, limits)
    except DataError:
        raise
    except _DECODE_ERRORS as err:
        raise DataError(f"{who}: unreadable image file {path.name}: {_reason(err, path)}") from err
    return data, _to_chw(arr, f"{who}: {path.name}")


def _to_chw(arr: np.ndarray, what: str) -> np.ndarray:
    """float32 (C, H, W) in [0, 1] from (H, W), (H, W, C) or (C, H, W), uint8 or float.

    Raises:
        DataError: prefixed with `what`, for any other shape or dtype, or floats
            outside [0, 1].
    """
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] not in (1, 3):
        arr = np.moveaxis(arr, -1, 0)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise DataError(
            f"{what}: image shape {arr.shape} is not (H, W), (H, W, C) or (C, H, W) "
            "with C in {1, 3}"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise DataError(f"{what}: float images must be finite and in [0, 1]")
        return arr.astype(np.float32)
    raise DataError(f"{what}: dtype {arr.dtype} is not uint8 or float")


def _read_images(files: list[Path], who: str, limits: ImageLimits,
                 labels: list[int] | None = None) -> tuple[torch.Tensor, str]:
    """Read `files` as one (N, C, H, W) tensor in [-1, 1] and the data hash of the
    bytes read (as `hash_files` would compute it, each name prefixed by its label
    when `labels` are given); `who` prefixes errors.

    Raises:
        DataError: from `_read_image`, or naming the first file whose shape differs
            from the first file's.
    """
    digest = hashlib.sha256()
    arrays = []
    for i, path in enumerate(files):
        data, arr = _read_image(path, who, limits)
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(
                f"{who}: {path.name} has shape {arr.shape}, but the images before it "
                f"have {arrays[0].shape}; all images must match"
            )
        name = path.name if labels is None else f"{labels[i]}/{path.name}"
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(data)
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)) * 2.0 - 1.0, digest.hexdigest()


def image_files(folder: Path, max_images: int | None = None) -> list[Path]:
    """The image files directly inside `folder`, sorted by name.

    Args:
        max_images: at most this many (default: CDM_MAX_IMAGES); counted while listing,
            so a huge folder is refused before it is sorted or read.

    Raises:
        DataError: naming the folder and the limit, for more image files than that.
        ValueError: a bad CDM_MAX_IMAGES, when `max_images` is not given.
    """
    limit = ImageLimits.from_env().max_images if max_images is None else max_images
    files = []
    for path in folder.iterdir():
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            files.append(path)
            if len(files) > limit:
                raise DataError(f"{folder} holds more than {limit} image files, the limit "
                                f"({MAX_IMAGES_ENV})")
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
    text = _read_file(path, who, max_bytes).decode("utf-8", errors="replace")
    mapping: dict[str, int] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or (number == 1 and [c.strip().lower() for c in row] == ["file", "label"]):
            continue
        if len(row) != 2:
            raise DataError(f"{who}: {LABELS_CSV} row {number} has {len(row)} fields; "
                            "expected file,label")
        name, label = row[0].strip(), row[1].strip()
        mapping[name] = parse_label(label, f"{who}: {LABELS_CSV} row {number} ({short(name, 64)})")
    return mapping


def scan_folder(folder: Path, who: str, limits: ImageLimits) -> tuple[list[Path], list[int] | None]:
    """The image files of a folder and their labels (None when it is unlabelled): one
    sub-folder per label, or flat files with a labels.csv, or flat files alone.

    Raises:
        DataError: images beside label folders, a bad label folder name, a file without
            a label or a labels.csv row without a file, too many image files.
    """
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
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
                     limits: ImageLimits | None = None) -> ContributorData:
    """Load and validate one contributor folder (labelled or not: module docstring).

    Args:
        folder: a directory holding the contributor's images.
        contributor_id: defaults to the folder's name.
        limits: bounds on files, bytes and pixels; default `ImageLimits.from_env()`.

    Raises:
        DataError: bad id, missing or empty folder, too many image files, a file too
            large or of too many pixels, unreadable file, mixed shapes, a missing or
            bad label.
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
    images, data_hash = _read_images(files, who, limits, labels)
    return ContributorData(contributor_id, images, data_hash,
                           None if labels is None else torch.tensor(labels, dtype=torch.long))


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
    images = _read_images(files, str(folder), limits, labels)[0]
    return images, None if labels is None else torch.tensor(labels, dtype=torch.long)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    arr = ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()
