"""Image input hardening: size, pixel and count limits, and broken files, all refused
as DataError naming one file and the limit, before anything large is allocated."""

import io
import os
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from conftest import write_pngs
from PIL import Image, ImageFile

from shards.data import ImageLimits, image_files, load_contributor, load_image_folder
from shards.errors import DataError


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(path, side=20000):
    """A valid side x side 1-bit grayscale PNG of zeros, compressed to a few tens of KB
    (decoded by PIL it would be side**2 bytes), written without ever holding the image."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


def noise_png(size=32, seed=0) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """A contributor folder of two good 8x8 PNGs."""
    folder = tmp_path / "ann"
    write_pngs(folder, np.zeros((2, 8, 8), dtype=np.uint8))
    return folder


@pytest.fixture
def never_decoded(monkeypatch):
    """Fail the test if PIL decodes (allocates) the pixels of any image over 64x64."""
    decode = ImageFile.ImageFile.load

    def load(self):
        if self.size[0] * self.size[1] > 64 * 64:
            raise AssertionError(f"decoded a {self.size} image")
        return decode(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def refused(folder, match, **kwargs):
    start = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(DataError, match=match) as err:
        load_contributor(folder, **kwargs)
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024
    return str(err.value)


def test_decompression_bomb_is_refused_from_its_header(folder, never_decoded):
    bomb = bomb_png(folder / "bomb.png")
    assert bomb.stat().st_size < 200_000  # 400 Mpixels on a small disk footprint
    message = refused(folder, r"bomb\.png exceeds the pixel limit of 262144 \(CDM_MAX_IMAGE_PIXELS\)")
    assert "img-000" not in message and str(folder / "bomb.png") not in message


def test_image_over_our_pixel_limit_is_refused_before_load(folder, never_decoded):
    bomb_png(folder / "wide.png", side=1000)  # 1 Mpixel: under PIL's limit, over ours
    refused(folder, r"wide\.png is 1000x1000 = 1000000 pixels, more than the limit of 262144 "
                    r"\(CDM_MAX_IMAGE_PIXELS\)")


def test_pixel_limit_from_the_environment(folder, monkeypatch):
    (folder / "big.png").write_bytes(noise_png(32))
    monkeypatch.setenv("CDM_MAX_IMAGE_PIXELS", "1000")
    refused(folder, r"big\.png is 32x32 = 1024 pixels, more than the limit of 1000")
    monkeypatch.setenv("CDM_MAX_IMAGE_PIXELS", "1024")
    with pytest.raises(DataError, match="img-000.png is 8x8 pixels, but 32x32 are expected"):
        load_contributor(folder)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pil_decompression_bomb_warning_and_error_become_data_errors(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a caller lowered PIL's own bound
    (folder / "img-002.png").write_bytes(noise_png(12))  # 144 > 100: PIL warns (an error here)
    refused(folder, r"img-002\.png exceeds the pixel limit of 262144")
    (folder / "img-002.png").write_bytes(noise_png(16))  # 256 > 2 x 100: PIL raises
    refused(folder, r"img-002\.png exceeds the pixel limit .*decompression bomb")


def test_oversize_file_is_refused_unread(folder, never_decoded):
    big = folder / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20))  # 1 MiB + 8 bytes
    refused(folder, r"huge\.png is larger than the limit of 1048576 bytes \(CDM_MAX_IMAGE_BYTES\)")


def test_byte_limit_from_the_environment(folder, monkeypatch):
    (folder / "img-002.png").write_bytes(noise_png(8))
    monkeypatch.setenv("CDM_MAX_IMAGE_BYTES", "50")
    refused(folder, r"img-000\.png is larger than the limit of 50 bytes")


@pytest.mark.parametrize("content", [b"not a png", b"GIF89a" + b"\0" * 64, None],
                         ids=["text", "gif-header", "real-jpeg"])
def test_non_png_with_png_suffix(folder, content):
    path = folder / "fake.png"
    if content is None:  # a decodable image, but not the format its name says
        Image.new("L", (8, 8)).save(path, "JPEG")
    else:
        path.write_bytes(content)
    message = refused(folder, r"unreadable image file fake\.png: not a PNG image")
    assert str(folder) not in message


@pytest.mark.parametrize("keep", [20, 2000], ids=["header", "pixels"])
def test_truncated_png(folder, keep):
    (folder / "cut.png").write_bytes(noise_png(64)[:keep])
    refused(folder, r"unreadable image file cut\.png: .*[Tt]runcated")


def test_npy_header_cannot_claim_more_than_the_file_holds(folder):
    """numpy would allocate the shape its header claims before reading the data."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((8, 8), dtype=np.uint8))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {**header, "shape": (10**9, 10**9)})
    (folder / "liar.npy").write_bytes(buf.getvalue() + b"\0" * 64)
    refused(folder, r"liar\.npy: the array's size does not match its \.npy header")


def test_npy_pixel_limit(folder, monkeypatch):
    np.save(folder / "big.npy", np.zeros((3, 40, 40), dtype=np.uint8))
    monkeypatch.setenv("CDM_MAX_IMAGE_PIXELS", "1000")
    refused(folder, r"big\.npy has 1600 pixels, more than the limit of 1000")


def test_too_many_images(folder, monkeypatch):
    write_pngs(folder, np.zeros((5, 8, 8), dtype=np.uint8))
    monkeypatch.setenv("CDM_MAX_IMAGES", "4")
    message = refused(folder, r"holds more than 4 image files, the limit \(CDM_MAX_IMAGES\)")
    assert "img-0" not in message  # never the folder's listing
    with pytest.raises(DataError, match="more than 4 image files"):
        load_image_folder(folder)
    assert len(image_files(folder, max_images=5)) == 5


@pytest.mark.parametrize("name", ["CDM_MAX_IMAGE_BYTES", "CDM_MAX_IMAGE_PIXELS", "CDM_MAX_IMAGES"])
@pytest.mark.parametrize("value", ["", "abc", "0", "-1", "1.5", "99999999999"])
def test_bad_environment_values(folder, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{name}=.* must be an integer in \[1, \d+\]") as err:
        load_contributor(folder)
    assert not isinstance(err.value, DataError)


def test_limits_are_checked_when_given_directly(folder):
    with pytest.raises(ValueError, match=r"max_pixels=0 \(CDM_MAX_IMAGE_PIXELS\)"):
        ImageLimits(max_pixels=0)
    limits = ImageLimits(max_bytes=10_000, max_pixels=64, max_images=2)
    assert len(load_contributor(folder, limits=limits)) == 2
    with pytest.raises(DataError, match="more than 1 image files"):
        load_contributor(folder, limits=ImageLimits(max_images=1))


def test_good_folder_and_hash_of_the_bytes_read(folder):
    from shards.data import hash_files

    data = load_contributor(folder)
    assert data.images.shape == (2, 1, 8, 8)
    assert data.data_hash == hash_files(image_files(folder))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_file_names_only_the_file(folder):
    (folder / "secret.png").write_bytes(noise_png(8))
    (folder / "secret.png").chmod(0)
    message = refused(folder, r"unreadable image file secret\.png: .*Permission denied")
    assert str(folder) not in message


# ---------------------------------------------------------------- links and sizes
def test_links_inside_a_data_folder_are_refused_unread(tmp_path, folder, monkeypatch):
    """A folder under the data roots may hold links to anywhere: an image file that is a
    link (to another contributor's PNG, to /etc/passwd) and a label folder that is one
    are refused, naming the link; the target is never opened."""
    import builtins

    outside = tmp_path / "someone-else"
    write_pngs(outside, np.full((3, 8, 8), 200, dtype=np.uint8))
    (folder / "stolen.png").symlink_to(outside / "img-000.png")
    refused(folder, r"ann/stolen\.png is a symbolic link; a data folder must hold its files")
    (folder / "stolen.png").unlink()
    (folder / "passwd.png").symlink_to("/etc/passwd")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    refused(folder, r"passwd\.png is a symbolic link")
    assert not any("passwd" in p for p in opened)
    assert builtins.open  # (os.open is what reads files; it never saw the link)
    (folder / "passwd.png").unlink()
    labelled = tmp_path / "bob"
    (labelled / "3").mkdir(parents=True)
    write_pngs(labelled / "3", np.zeros((2, 8, 8), dtype=np.uint8))
    (labelled / "4").symlink_to(outside, target_is_directory=True)
    refused(labelled, r"folder 4/ is a symbolic link")


def test_a_link_swapped_in_after_listing_is_not_followed(folder, tmp_path):
    """The check at listing time has a twin at open time (O_NOFOLLOW): a file replaced by
    a link between the two is refused, not read."""
    from shards.decode import read_file

    target = tmp_path / "secret.png"
    target.write_bytes(noise_png(8))
    (folder / "img-000.png").unlink()
    (folder / "img-000.png").symlink_to(target)
    with pytest.raises(DataError, match=r"img-000\.png is a symbolic link"):
        read_file(folder / "img-000.png", "contributor 'ann'", 1 << 20)


def test_an_add_checks_each_images_size_against_the_store_before_decoding(tmp_path, never_decoded):
    """300 solid 512x512 PNGs (a few KB each on disk, 786 KB decoded) added to a store
    of 8x8 images: refused from the first header, nothing decoded, memory flat."""
    folder = tmp_path / "big"
    write_pngs(folder, np.zeros((300, 512, 512), dtype=np.uint8))
    message = refused(folder, r"img-000\.png is 512x512 pixels, but 8x8 are expected",
                      shape=(1, 8, 8))
    assert "img-001" not in message


def test_the_decoded_size_of_a_folder_is_bounded(folder, monkeypatch):
    write_pngs(folder, np.zeros((6, 8, 8), dtype=np.uint8))  # 6 images of 256 bytes (float32)
    monkeypatch.setenv("CDM_MAX_DECODED_BYTES", str(5 * 256))
    refused(folder, r"its 6 images would take more than 1280 bytes decoded "
                    r"\(CDM_MAX_DECODED_BYTES\)")
    monkeypatch.setenv("CDM_MAX_DECODED_BYTES", str(6 * 256))
    assert len(load_contributor(folder)) == 6
