"""Data folders named by a request are confined to the data roots (service/paths.py)."""

import os
from pathlib import Path

import pytest

from service.paths import DATA_ROOTS_ENV, allowed_roots, resolve_data_folder


@pytest.fixture
def root(tmp_path):
    """A data root holding alice/ (a data folder with a file) and a file."""
    root = tmp_path / "data"
    (root / "alice").mkdir(parents=True)
    (root / "alice" / "img-000.png").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    return root.resolve()


def check_refused(path, roots, match):
    with pytest.raises(ValueError, match=match) as err:
        resolve_data_folder(path, roots)
    message = str(err.value)
    for name in ("img-000", "notes.txt", "alice"):  # never a folder's listing
        assert name in str(path) or name not in message
    assert all(str(r) in message for r in roots)  # names the roots
    return message


@pytest.mark.parametrize("path", ["/", "/etc", "/proc", "/proc/self/cwd", "/etc/../etc"])
def test_system_folders_are_outside(root, path):
    message = check_refused(path, [root], "is outside the allowed data roots")
    assert repr(path) in message


def test_dot_dot_escapes(root, monkeypatch):
    monkeypatch.chdir(root / "alice")
    check_refused("../..", [root], "outside")
    check_refused(str(root / "alice" / ".." / ".."), [root], "outside")
    check_refused("../../data-other", [root], "outside")  # a sibling sharing the prefix
    assert resolve_data_folder("..", [root]) == root  # relative to the working directory


def test_symlink_inside_a_root_pointing_outside(root, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "img-000.png").write_bytes(b"x")
    (root / "link").symlink_to(outside, target_is_directory=True)
    check_refused(str(root / "link"), [root], "'.*link' is outside")
    (root / "etc").symlink_to("/etc")
    check_refused(str(root / "etc"), [root], "outside")
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(ValueError, match="loop"):
        resolve_data_folder(str(root / "loop"), [root])


def test_symlink_inside_a_root_pointing_inside_is_resolved(root):
    (root / "alias").symlink_to(root / "alice", target_is_directory=True)
    assert resolve_data_folder(str(root / "alias"), [root]) == root / "alice"


def test_file_missing_and_bad_paths(root):
    check_refused(str(root / "notes.txt"), [root], "notes.txt' is not a directory")
    check_refused(str(root / "nobody"), [root], "nobody' does not exist")
    for bad, match in [("", "empty"), ("  ", "empty"), ("a\0b", "NUL")]:
        with pytest.raises(ValueError, match=match):
            resolve_data_folder(bad, [root])


def test_outside_is_refused_before_existence_is_checked(root):
    """A refusal must not tell a caller which paths exist outside the roots."""
    one = check_refused("/etc", [root], "outside")
    two = check_refused("/no/such/folder", [root], "outside")
    assert one.replace("/etc", "X") == two.replace("/no/such/folder", "X")


def test_long_path_is_cut_in_the_message(root):
    long = "/" + "x" * 5000
    message = check_refused(long, [root], "outside")
    assert "x" * 200 not in message and "x" * 199 in message and len(message) < 600


def test_good_folder(root):
    assert resolve_data_folder(str(root / "alice"), [root]) == root / "alice"
    assert resolve_data_folder(str(root), [root]) == root


def test_two_roots_from_the_environment(tmp_path, monkeypatch, root):
    other = tmp_path / "more"
    (other / "bob").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ROOTS_ENV, os.pathsep.join([str(root), "more", ""]))
    roots = allowed_roots(tmp_path / "store")
    assert roots == [root, other.resolve()]  # relative entries resolved, empty ones skipped
    assert resolve_data_folder(str(root / "alice"), roots) == root / "alice"
    assert resolve_data_folder("more/bob", roots) == other.resolve() / "bob"
    message = check_refused(str(tmp_path), roots, "outside")
    assert str(root) in message and str(other.resolve()) in message


def test_empty_environment_value_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOTS_ENV, os.pathsep)
    with pytest.raises(ValueError, match=f"{DATA_ROOTS_ENV} is set but names no folder"):
        allowed_roots(tmp_path / "store")


def test_default_root_is_the_folder_holding_the_store(tmp_path, monkeypatch, root):
    monkeypatch.delenv(DATA_ROOTS_ENV, raising=False)
    store = root / "store"
    roots = allowed_roots(store)
    assert roots == [root]
    assert resolve_data_folder(str(root / "alice"), roots) == root / "alice"
    check_refused(str(tmp_path), roots, "outside")
    monkeypatch.chdir(root)
    assert allowed_roots("store") == [root]  # a relative store path, resolved


def test_no_default_root_for_a_store_at_the_top_of_the_filesystem(monkeypatch):
    """A store at /store would make / the data root: every folder a request names.
    Without CDM_DATA_ROOTS such a store admits none."""
    monkeypatch.delenv("CDM_DATA_ROOTS", raising=False)
    assert allowed_roots(Path("/store")) == []
    with pytest.raises(ValueError, match="outside the allowed data roots: none; set CDM_DATA_ROOTS"):
        resolve_data_folder("/etc", allowed_roots(Path("/store")))
    assert allowed_roots(Path("/srv/cdm/store")) == [Path("/srv/cdm")]
