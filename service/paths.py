"""Which folders on this machine a request may name as contributor data.

Admitting a contributor by folder path (`POST /contributors`, `cdm add`) reads that
folder with the service's permissions, so a path from a request is confined to the
*data roots*: CDM_DATA_ROOTS, os.pathsep-separated folders (absolute, or relative to
the working directory), or by default the folder that holds the store. Paths are
compared after symlinks are resolved, so neither `..` nor a symlink inside a root
that points outside it leaves the roots. Refusals name the path given and the roots,
never what a folder holds; a path outside the roots is refused before it is looked
at, so a refusal says nothing about what exists elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from shards.settings import DATA_ROOTS_ENV

SHOWN_PATH_CHARS = 200


def _shown(path: str) -> str:
    """`path` as a message shows it: quoted, cut to SHOWN_PATH_CHARS characters."""
    cut = path[:SHOWN_PATH_CHARS]
    return repr(cut) + ("..." if len(path) > SHOWN_PATH_CHARS else "")


def _resolve(path: str | Path) -> Path:
    """`path` made absolute with every symlink resolved (the missing tail kept as is).

    Raises:
        ValueError: a symlink loop, or a path the OS refuses to resolve.
    """
    try:
        return Path(path).resolve(strict=False)
    except (OSError, RuntimeError) as err:  # RuntimeError: symlink loop before 3.13
        raise ValueError(f"cannot resolve {_shown(str(path))}: {type(err).__name__}") from err


def allowed_roots(store_root: Path) -> list[Path]:
    """The data roots: the folders of CDM_DATA_ROOTS, resolved, or when it is unset
    the folder holding `store_root` (the layout `make store` and docs/usage.md use),
    unless that is the filesystem's root: then none (set CDM_DATA_ROOTS).

    Raises:
        ValueError: CDM_DATA_ROOTS is set but names no folder, or one of its folders
            cannot be resolved.
    """
    raw = os.environ.get(DATA_ROOTS_ENV)
    if raw is None:
        parent = _resolve(store_root).parent
        # a store at the top of the filesystem would make every folder a data root
        return [] if parent == parent.parent else [parent]
    roots = [_resolve(part) for part in raw.split(os.pathsep) if part.strip()]
    if not roots:
        raise ValueError(f"{DATA_ROOTS_ENV} is set but names no folder: give one or more "
                         f"folders separated by {os.pathsep!r}, or unset it")
    return list(dict.fromkeys(roots))


def resolve_data_folder(path: str, roots: list[Path]) -> Path:
    """The real (symlink-free) path of data folder `path` if it lies inside one of
    `roots` and is an existing directory.

    Args:
        path: as the request gave it; relative paths are relative to the working
            directory.
        roots: from `allowed_roots`.

    Raises:
        ValueError: naming `path` (cut to 200 characters) and the roots, for a path that is empty, holds a NUL byte, cannot be resolved,
            lies outside every root (`..` and symlinks included), does not exist or is
            not a directory. Never lists what a folder holds.
    """
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"data folder must be a path string, not {type(path).__name__}")
    path = os.fspath(path)
    if not path.strip():
        raise ValueError("data folder path is empty")
    if "\0" in path:
        raise ValueError(f"data folder {_shown(path)} holds a NUL byte")
    resolved = _resolve(path)
    real_roots = [_resolve(root) for root in roots]
    where = f"allowed data roots: {', '.join(str(root) for root in real_roots) or 'none'}"
    if not any(resolved.is_relative_to(root) for root in real_roots):
        raise ValueError(f"data folder {_shown(path)} is outside the {where}; "
                         f"set {DATA_ROOTS_ENV} to admit others")
    if not resolved.exists():
        raise ValueError(f"data folder {_shown(path)} does not exist ({where})")
    if not resolved.is_dir():
        raise ValueError(f"data folder {_shown(path)} is not a directory ({where})")
    return resolved
