import numpy as np
import pytest
from conftest import write_pngs
from PIL import Image

from shards.data import load_contributor, load_contributors, validate_contributor_id
from shards.demo import write_demo_data
from shards.errors import DataError


@pytest.mark.parametrize("bad", ["", "A", "../etc", "a/b", ".hidden", "-a", "a" * 65, "a b", "é"])
def test_bad_contributor_ids_are_rejected(bad):
    with pytest.raises(DataError, match="invalid contributor id"):
        validate_contributor_id(bad)


@pytest.mark.parametrize("good", ["a", "alice", "c0_x-1", "9" * 64])
def test_good_contributor_ids(good):
    assert validate_contributor_id(good) == good


def gray(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_empty_folder_names_the_contributor(tmp_path):
    (tmp_path / "d" / "zoe").mkdir(parents=True)
    with pytest.raises(DataError, match="'zoe': no images"):
        load_contributors(tmp_path / "d")


def test_mixed_sizes_name_the_file(tmp_path):
    folder = tmp_path / "ann"
    write_pngs(folder, gray(2))
    Image.fromarray(gray(1, size=16)[0]).save(folder / "zz-big.png")
    with pytest.raises(DataError, match="zz-big.png is 16x16 pixels, but 8x8 are expected"):
        load_contributor(folder)


def test_unreadable_file_is_named(tmp_path):
    folder = tmp_path / "ann"
    write_pngs(folder, gray(2))
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable image file .*broken.png"):
        load_contributor(folder)


def test_bad_id_folder_is_rejected(tmp_path):
    write_pngs(tmp_path / "d" / "Bad.Name", gray(2))
    with pytest.raises(DataError, match="invalid contributor id 'Bad.Name'"):
        load_contributors(tmp_path / "d")


def test_contributors_with_different_shapes(tmp_path):
    write_pngs(tmp_path / "d" / "a", gray(2))
    write_pngs(tmp_path / "d" / "b", gray(2, size=16))
    with pytest.raises(DataError, match="contributor 'b' has images of shape"):
        load_contributors(tmp_path / "d")


def test_images_directly_in_data_dir(tmp_path):
    write_pngs(tmp_path / "d", gray(1))
    with pytest.raises(DataError, match="one folder per contributor"):
        load_contributors(tmp_path / "d")


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_contributors(tmp_path / "nope")


def test_npy_and_rgb_and_hash(tmp_path):
    folder = tmp_path / "rgb"
    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    write_pngs(folder, rgb, mode="RGB")
    np.save(folder / "extra.npy", np.random.default_rng(2).random((4, 4, 3)).astype(np.float32))
    data = load_contributor(folder)
    assert data.images.shape == (4, 3, 4, 4)
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert load_contributor(folder).data_hash == data.data_hash
    np.save(folder / "extra.npy", np.zeros((4, 4, 3), dtype=np.float32))
    assert load_contributor(folder).data_hash != data.data_hash


def test_npy_out_of_range_floats(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    np.save(folder / "x.npy", np.full((4, 4), 2.0, dtype=np.float32))
    with pytest.raises(DataError, match="in \\[0, 1\\]"):
        load_contributor(folder)


def test_demo_data_layout_and_ownership(tmp_path):
    table = write_demo_data(tmp_path / "demo")
    contributors = table["contributors"]
    assert len(contributors) >= 6
    assert sum(e["corrupted"] for e in contributors.values()) == 1
    classes = [set(e["classes"]) for e in contributors.values() if not e["corrupted"]]
    assert any(a & b for i, a in enumerate(classes) for b in classes[i + 1:])  # an overlapping pair
    loaded = load_contributors(tmp_path / "demo" / "contributors")
    assert {d.contributor_id for d in loaded} == set(contributors)
    assert all(d.image_shape == (1, 8, 8) for d in loaded)
    assert sum(table["heldout_images"].values()) > 300
    with pytest.raises(DataError, match="not empty"):
        write_demo_data(tmp_path / "demo")


def test_licence_json_is_read_and_checked(tmp_path):
    folder = tmp_path / "zoe"
    write_pngs(folder, gray(3))
    assert load_contributor(folder).licence is None
    (folder / "licence.json").write_text('{"licence": "CC-BY-4.0", "attribution": " Art by Zoe, CC-BY 4.0 "}')
    assert load_contributor(folder).licence == {"licence": "CC-BY-4.0",
                                                "attribution": "Art by Zoe, CC-BY 4.0"}
    for bad in ('{"licence": "MIT"}', '["MIT"]', "not json", '{"licence": "", "attribution": "x"}',
                '{"licence": "MIT", "attribution": "x", "extra": 1}',
                '{"licence": "' + "x" * 65 + '", "attribution": "x"}'):
        (folder / "licence.json").write_text(bad)
        with pytest.raises(DataError, match="contributor 'zoe': licence.json must be a JSON object"):
            load_contributor(folder)
