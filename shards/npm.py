"""Pinned npm packages, fetched once through npm and checked against their integrity.

The studios data set (`studios.py`) is built from artwork that emoji studios publish
on the npm registry. `npm pack NAME@VERSION` downloads a package's tarball (npm's own
cache makes later runs local); the tarball's sha512 must equal the integrity pinned
here, the one the registry published for that version, so the bytes the data set is
built from are exactly these. Files are then read from the tarball without unpacking.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DataError
from .settings import cache_dir

# name -> (version, the registry's dist.integrity for it)
PINNED = {
    "emoji-datasource": ("16.0.0", "sha512-/qHKqK5Nr3+8zhgO6kHmF43Fm5C8HNn0AaFRIpgw8HF3+uF0"
                                   "Vfc8jgLI1ZQS5ba1vBzksS8NBCjHejwLb2D/Sg=="),
    "emoji-datasource-google": ("16.0.0", "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQ"
                                          "Qlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "emoji-datasource-twitter": ("16.0.0", "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4"
                                           "pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
    "openmoji": ("17.0.0", "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD"
                           "3lrPc5N9CzsyPnRTk0Vp4UaI9w=="),
    "fluentui-emoji": ("1.3.0", "sha512-JTXXwqIie2rWTgOkIJDJxr0WtwTz2WU4kdOq8buLVThYwQ264aFR2jdT"
                                "yuon2oEbLqqGMT64zI4btyn1saB2xw=="),
}


def default_dir() -> Path:
    """Where tarballs are kept: $CDM_NPM_DIR, else ~/.cache/cdm-serve/npm."""
    env = os.environ.get("CDM_NPM_DIR")
    if env:
        return Path(env)
    return cache_dir() / "npm"


def integrity(path: Path) -> str:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha512")
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def tarball(name: str, folder: Path | None = None) -> Path:
    """The verified tarball of the pinned version of package `name`, fetched with
    `npm pack` into `folder` (default `default_dir()`) if it is not there yet.

    Raises:
        DataError: `name` is not pinned; npm is missing or fails; the tarball's sha512
            is not the pinned integrity (the file is then removed).
    """
    if name not in PINNED:
        raise DataError(f"npm package {name!r} is not pinned; pinned: {sorted(PINNED)}")
    version, expected = PINNED[name]
    folder = Path(folder) if folder is not None else default_dir()
    path = folder / f"{name}-{version}.tgz"
    if not path.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise DataError(f"npm package {name}@{version}: npm is not installed (Node.js; "
                            "`make studios` installs it from Debian's packages)")
        folder.mkdir(parents=True, exist_ok=True)
        run = subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", str(folder),
                              "--silent"], capture_output=True, text=True, timeout=1800)
        if run.returncode != 0 or not path.is_file():
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"npm package {name}@{version}: `npm pack` failed: {last[:300]}")
    found = integrity(path)
    if found != expected:
        path.unlink()
        raise DataError(f"npm package {name}@{version}: {path.name} has integrity "
                        f"{found[:30]}..., not the pinned {expected[:30]}... (removed; "
                        "fetch again)")
    return path


def read_members(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path inside the package, bytes) of each regular file of tarball `path` whose
    package-relative path passes `want`, in archive order. npm tarballs put every file
    under `package/`."""
    with tarfile.open(path, "r:gz") as archive:
        for member in archive:
            if not member.isfile():
                continue
            inner = member.name.split("/", 1)[1] if "/" in member.name else member.name
            if want(inner):
                yield inner, archive.extractfile(member).read()
