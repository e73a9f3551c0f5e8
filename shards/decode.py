"""Reading image files from folders that may come from an untrusted upload: every
file is read once and at most a bounded number of bytes, its header is checked before
its pixels are decoded, and errors name the file (never a folder's listing).

Limits (shards/settings.py; a small PNG can decode to gigabytes): a file larger than
CDM_MAX_IMAGE_BYTES (default 1 MiB) is not read; an image whose header claims more
than CDM_MAX_IMAGE_PIXELS pixels (default 512 x 512), or another size than the images
before it (or than the store's, when adding to one), is not decoded; a folder with
more than CDM_MAX_IMAGES image files (default 100000), or whose images would take more
than CDM_MAX_DECODED_BYTES decoded (default 2 GiB), is not loaded. A file is opened
only if it is not a symbolic link (a data folder holds its files itself: a link could
point outside the folders a request may name). A `.png` must hold a PNG and a
`.jpg`/`.jpeg` a JPEG (no other decoder of PIL runs). A `.npy` file holds one image,
shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3}, either uint8 in [0, 255] or
floats in [0, 1].
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .settings import VARIABLES, check_int, env_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
# what a broken file can make PIL's or numpy's readers raise (besides DataError's own)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                  struct.error, zlib.error)
_LIMITS = (("max_bytes", "CDM_MAX_IMAGE_BYTES"), ("max_pixels", "CDM_MAX_IMAGE_PIXELS"),
           ("max_images", "CDM_MAX_IMAGES"), ("max_decoded", "CDM_MAX_DECODED_BYTES"))


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what loading a folder may read and decode (the module docstring);
    defaults are the variables' defaults."""

    max_bytes: int = VARIABLES["CDM_MAX_IMAGE_BYTES"].default
    max_pixels: int = VARIABLES["CDM_MAX_IMAGE_PIXELS"].default
    max_images: int = VARIABLES["CDM_MAX_IMAGES"].default
    max_decoded: int = VARIABLES["CDM_MAX_DECODED_BYTES"].default

    def __post_init__(self):
        """Raises ValueError naming the field, its variable and its allowed range."""
        for field, env in _LIMITS:
            check_int(env, getattr(self, field), field)

    @classmethod
    def from_env(cls) -> ImageLimits:
        """The limits in CDM_MAX_IMAGE_BYTES, CDM_MAX_IMAGE_PIXELS, CDM_MAX_IMAGES and
        CDM_MAX_DECODED_BYTES, read now (so a changed environment applies to the next
        load).

        Raises:
            ValueError: naming the variable and its allowed range, for a bad value.
        """
        return cls(*(env_int(env) for _, env in _LIMITS))


def _reason(err: BaseException, path: Path) -> str:
    """`err`'s message with `path` shortened to its file name (no server paths)."""
    return str(err).replace(str(path), path.name)


def read_file(path: Path, who: str, max_bytes: int) -> bytes:
    """The bytes of regular file `path`, read once and at most `max_bytes` of them.

    The size is checked on the open file (a name swapped for a FIFO, a device or a
    symbolic link after listing is refused, not read: O_NOFOLLOW) and again on what
    was read (a file that grew, or a /proc-like file reporting size 0, cannot slip
    past the limit).

    Raises:
        DataError: naming the file and the limit, for a file too large, not regular, a
            symbolic link or unreadable.
    """
    too_large = (f"{who}: {path.name} is larger than the limit of {max_bytes} bytes "
                 f"(CDM_MAX_IMAGE_BYTES)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise DataError(f"{who}: {path.name} is not a regular file")
            if info.st_size > max_bytes:
                raise DataError(f"{too_large}: it has {info.st_size} bytes")
            data = f.read(max_bytes + 1)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(f"{who}: {path.name} is a symbolic link; a data folder must hold "
                            "its files itself") from err
        raise DataError(f"{who}: unreadable image file {path.name}: {_reason(err, path)}") from err
    if len(data) > max_bytes:
        raise DataError(too_large)
    return data


def _check_size(name: str, who: str, height: int, width: int,
                expect: tuple[int, int] | None) -> None:
    """Raise DataError, from the header and before decoding, for an image whose size
    is not `expect` (H, W)."""
    if expect is not None and (height, width) != tuple(expect):
        raise DataError(f"{who}: {name} is {width}x{height} pixels, but {expect[1]}x{expect[0]} "
                        "are expected (the images before it, or the store's); all images "
                        "must match")


def _npy_hw(shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of an image array of `shape` (2 or 3 dimensions), read the way `_to_chw`
    reads it."""
    if len(shape) == 3 and shape[-1] in (1, 3) and shape[0] not in (1, 3):
        return shape[0], shape[1]
    return shape[-2], shape[-1]


def _npy_pixels(shape: tuple[int, ...]) -> int:
    """Pixels (H x W) of an array of `shape` (every element, if it is no image)."""
    return math.prod(_npy_hw(shape)) if len(shape) in (2, 3) else math.prod(shape)


def _decode_npy(name: str, data: bytes, who: str, limits: ImageLimits,
                expect: tuple[int, int] | None = None) -> np.ndarray:
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
                        f"{limits.max_pixels} (CDM_MAX_IMAGE_PIXELS)")
    if len(shape) in (2, 3):
        _check_size(name, who, *_npy_hw(shape), expect)
    buf.seek(0)
    return np.load(buf, allow_pickle=False)


def _decode_pil(name: str, fmt: str, data: bytes, who: str, limits: ImageLimits,
                expect: tuple[int, int] | None = None) -> np.ndarray:
    """One PNG or JPEG as an array; its size is checked from the header PIL reads at
    `Image.open`, before `load` decodes (and allocates) the pixels."""
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise DataError(
                    f"{who}: {name} is {width}x{height} = {width * height} pixels, more than "
                    f"the limit of {limits.max_pixels} (CDM_MAX_IMAGE_PIXELS)")
            _check_size(name, who, height, width, expect)
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
                        f"(CDM_MAX_IMAGE_PIXELS): {err}") from err
    except UnidentifiedImageError as err:
        raise DataError(f"{who}: unreadable image file {name}: not a {fmt} image") from err


def _read_image(path: Path, who: str, limits: ImageLimits,
                expect: tuple[int, int] | None = None) -> tuple[bytes, np.ndarray]:
    """Read one file (bounded), decode it; returns its bytes and float32 (C, H, W) in
    [0, 1].

    Raises:
        DataError: naming the file (by name, not full path) and the limit it broke, for
            a file too large, too many pixels, not the format its suffix names,
            truncated or otherwise unreadable, or of a shape or dtype that is no image.
    """
    data = read_file(path, who, limits.max_bytes)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = _decode_npy(path.name, data, who, limits, expect)
        else:
            arr = _decode_pil(path.name, PIL_FORMATS[suffix], data, who, limits, expect)
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


def read_images(files: list[Path], who: str, limits: ImageLimits,
                labels: list[int] | None = None,
                shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, str]:
    """Read `files` as one (N, C, H, W) tensor in [-1, 1] and the data hash of the
    bytes read (as `shards.data.hash_files` would compute it, each name prefixed by its
    label when `labels` are given); `who` prefixes errors. Every image must have the
    first one's size, or `shape` (C, H, W) when given: checked from each header before
    it is decoded.

    Raises:
        DataError: from `_read_image`, naming the first file whose shape differs, or
            when the images would take more than CDM_MAX_DECODED_BYTES decoded.
    """
    digest = hashlib.sha256()
    arrays = []
    expect = None if shape is None else tuple(shape[1:])
    for i, path in enumerate(files):
        if arrays and (i + 1) * arrays[0].nbytes > limits.max_decoded:
            raise DataError(f"{who}: its {len(files)} images would take more than "
                            f"{limits.max_decoded} bytes decoded (CDM_MAX_DECODED_BYTES)")
        data, arr = _read_image(path, who, limits, expect)
        expect = arr.shape[1:]
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


def read_table(path: Path, who: str, max_bytes: int, column: str,
               hint: str = "") -> list[tuple[int, str, str]]:
    """The rows `file,<column>` of a folder's CSV (labels.csv, captions.csv) as
    (row number, file stripped, value as written); an optional header and empty rows
    are skipped.

    Raises:
        DataError: naming the file and row, for a row of other than two fields; and as
            `read_file`.
    """
    text = read_file(path, who, max_bytes).decode("utf-8", errors="replace")
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or (number == 1 and [c.strip().lower() for c in row] == ["file", column]):
            continue
        if len(row) != 2:
            raise DataError(f"{who}: {path.name} row {number} has {len(row)} fields; "
                            f"expected file,{column}{hint}")
        rows.append((number, row[0].strip(), row[1]))
    return rows
