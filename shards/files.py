"""Writing files so that a crash leaves the old or the new version, never a partial
one; and the hashes that name what was written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch


def fsync_dir(folder: Path) -> None:
    """Make a rename (or a deletion) in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temp file beside `path`, fsync it, rename over `path`, fsync
    the directory: readers see the old or the new file, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_weights(folder: Path) -> dict[str, bytes]:
    """The safetensors files of a saved model folder, by name (empty if it is gone)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.safetensors"))}


def weights_hash(files: dict[str, bytes]) -> str:
    """sha256 over (name, bytes) of each file, in name order: a model folder's hash."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(files[name])
    return digest.hexdigest()


def read_verified(folder: Path, expected: str) -> dict[str, bytes]:
    """The safetensors files of `folder` if their hash is `expected`, else {} (gone,
    or other weights)."""
    files = read_weights(folder)
    return files if files and weights_hash(files) == expected else {}


def files_hash(folder: Path) -> str:
    """sha256 over the safetensors files of a saved model folder."""
    return weights_hash(read_weights(folder))


def tensor_hash(tensor: torch.Tensor, labels: torch.Tensor | None = None,
                captions: list[str] | None = None) -> str:
    """sha256 over a tensor's bytes (the public data's hash in the manifest), and over
    its labels and captions where a model trained on them too."""
    digest = hashlib.sha256(tensor.contiguous().numpy().tobytes())
    if labels is None and captions is None:
        return digest.hexdigest()
    if labels is not None:
        digest.update(b"labels:" + labels.contiguous().numpy().tobytes())
    if captions is not None:
        digest.update(b"captions:" + json.dumps(list(captions)).encode())
    return digest.hexdigest()


def sweep(root: Path, folder: str, known: set[str]) -> list[str]:
    """Delete the children of `root/folder` that are staging folders (`.<id>.partial`)
    or name no id in `known`; returns the store-relative paths deleted."""
    deleted = []
    parent = Path(root) / folder
    if parent.is_dir():
        for child in sorted(parent.iterdir()):
            if child.name.endswith(".partial") or child.name not in known:
                shutil.rmtree(child, ignore_errors=True)
                deleted.append(f"{folder}/{child.name}")
    return deleted


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """A sibling temp folder to build `final` in: renamed into place when the block
    ends (`final` absent or an empty folder), deleted if the block raises, so `final`
    is either complete or absent."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
