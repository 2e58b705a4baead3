"""Local sources: the sample SVS, synthetic OME-TIFF pyramids, plain TIFF, PNG/JPEG, and damaged files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from lpfm_toolkit.errors import CorruptImageError, RegionError, SlideNotFoundError, UnsupportedFormatError
from lpfm_toolkit.sources import open_image
from lpfm_toolkit.sources.local import OpenSlideHandle, PillowHandle, TiffHandle

SAMPLE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def write_ome_pyramid(
    path: Path, img: np.ndarray, mpp: float, axes: str, channel_names: list[str] | None = None, levels: int = 3
) -> None:
    """An OME-TIFF pyramid in SubIFDs written by tifffile itself (an independent writer)."""
    meta = {"axes": axes, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    if channel_names:
        meta["Channel"] = {"Name": channel_names}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(
            img,
            subifds=levels - 1,
            tile=(64, 64),
            metadata=meta,
            photometric="rgb" if axes.endswith("S") else "minisblack",
            compression="zlib",
        )
        for i in range(1, levels):
            if axes == "CYX":
                sub = img[:, :: 2**i, :: 2**i]
            else:
                sub = img[:: 2**i, :: 2**i]
            tw.write(
                sub,
                subfiletype=1,
                tile=(64, 64),
                photometric="rgb" if axes.endswith("S") else "minisblack",
                compression="zlib",
            )


def test_sample_slide_is_the_published_file(sample_slide: Path) -> None:
    assert hashlib.sha256(sample_slide.read_bytes()).hexdigest() == SAMPLE_SHA256


def test_svs_through_openslide(sample_slide: Path) -> None:
    with open_image(sample_slide) as h:
        assert isinstance(h, OpenSlideHandle)
        assert (h.levels[0].width, h.levels[0].height) == (2220, 2967)
        assert h.mpp == pytest.approx((0.499, 0.499))
        assert h.channel_names == ["R", "G", "B"] and h.is_rgb
        tile = h.read_region(0, 1000, 1000, 64, 48)
        assert tile.shape == (48, 64, 3) and tile.dtype == np.uint8
        assert tile.std() > 5  # tissue, not blank
        d = h.describe()
        assert d["vendor"] == "aperio"


def test_ome_rgb_pyramid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    p = tmp_path / "rgb.ome.tiff"
    write_ome_pyramid(p, img, 0.25, "YXS")
    with open_image(p) as h:
        assert isinstance(h, TiffHandle)
        assert [(lv.width, lv.height) for lv in h.levels] == [(400, 300), (200, 150), (100, 75)]
        assert [lv.downsample for lv in h.levels] == [1.0, 2.0, 4.0]
        assert h.mpp == pytest.approx((0.25, 0.25))
        assert h.channel_names == ["R", "G", "B"]
        np.testing.assert_array_equal(h.read_region(0, 10, 20, 100, 50), img[20:70, 10:110])
        np.testing.assert_array_equal(h.read_region(1, 5, 5, 30, 20), img[::2, ::2][5:25, 5:35])


def test_ome_multichannel_16bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 65535, (2, 256, 320), dtype=np.uint16)
    p = tmp_path / "fluo.ome.tif"
    write_ome_pyramid(p, img, 0.5, "CYX", ["DAPI", "Eosin"], levels=2)
    with open_image(p) as h:
        assert h.channel_names == ["DAPI", "Eosin"]
        assert h.dtype == np.uint16 and not h.is_rgb
        region = h.read_region(0, 30, 40, 50, 60)
        assert region.shape == (60, 50, 2)
        np.testing.assert_array_equal(region, img[:, 40:100, 30:80].transpose(1, 2, 0))
        assert len(h.levels) == 2


def test_generic_tiled_rgb_tiff_goes_through_openslide(tmp_path: Path) -> None:
    img = np.random.default_rng(5).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    p = tmp_path / "generic.tif"
    tifffile.imwrite(p, img, tile=(128, 128), photometric="rgb", compression="zlib")
    with open_image(p) as h:
        assert isinstance(h, OpenSlideHandle)
        np.testing.assert_array_equal(h.read_region(0, 50, 60, 200, 100), img[60:160, 50:250])


def test_plain_untiled_tiff_with_resolution(tmp_path: Path) -> None:
    img = np.arange(120 * 90, dtype=np.uint16).reshape(120, 90)
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, img, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_image(p) as h:
        assert isinstance(h, TiffHandle)
        assert h.mpp == pytest.approx((0.5, 0.5))
        assert h.channel_names == ["C0"]
        np.testing.assert_array_equal(h.read_region(0, 3, 4, 10, 5)[:, :, 0], img[4:9, 3:13])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_png_and_jpeg_crops(tmp_path: Path, suffix: str) -> None:
    img = np.full((40, 60, 3), 200, np.uint8)
    img[10:20, 10:30] = (120, 40, 160)
    p = tmp_path / f"crop{suffix}"
    Image.fromarray(img).save(p)
    with open_image(p, mpp=0.5) as h:
        assert isinstance(h, PillowHandle)
        assert h.mpp == (0.5, 0.5) and h.levels[0].width == 60
        out = h.read_region(0, 0, 0, 60, 40)
        assert np.abs(out.astype(int) - img).mean() <= (0 if suffix == ".png" else 3)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError, match="does not exist"):
        open_image(tmp_path / "nope.svs")
    with pytest.raises(FileNotFoundError):  # also the built-in
        open_image(tmp_path / "nope.svs")


def test_empty_and_garbage_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty"):
        open_image(empty)
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"not a slide at all" * 100)
    with pytest.raises((UnsupportedFormatError, CorruptImageError)):
        open_image(garbage)
    unknown = tmp_path / "notes.xyz"
    unknown.write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="not recognised"):
        open_image(unknown)


def test_truncated_svs(tmp_path: Path, sample_slide: Path) -> None:
    data = sample_slide.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptImageError):
        with open_image(cut) as h:
            h.read_region(0, 0, h.levels[0].height - 512, 512, 512)


def test_truncated_ome_tiff(tmp_path: Path) -> None:
    img = np.random.default_rng(3).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    p = tmp_path / "t.ome.tiff"
    write_ome_pyramid(p, img, 0.5, "YXS", levels=1)
    data = p.read_bytes()
    cut = tmp_path / "cut.ome.tiff"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError):
        with open_image(cut) as h:
            h.read_region(0, 0, 0, 512, 512)


def test_bad_regions(sample_slide: Path) -> None:
    with open_image(sample_slide) as h:
        with pytest.raises(RegionError, match="outside"):
            h.read_region(0, 2200, 0, 100, 100)
        with pytest.raises(RegionError, match="empty"):
            h.read_region(0, 0, 0, 0, 10)
        with pytest.raises(RegionError, match="level 3 does not exist"):
            h.read_region(3, 0, 0, 10, 10)


def _open_fds() -> set[str]:
    return {str(Path(f"/proc/self/fd/{fd}").resolve()) for fd in __import__("os").listdir("/proc/self/fd")}


def test_a_header_declaring_an_impossible_size_is_refused_and_the_file_closed(tmp_path: Path) -> None:
    import struct

    path = tmp_path / "huge.tif"  # 10^6 × 10^6 px declared, 256 bytes of data
    entries = [
        (256, 4, 10**6),
        (257, 4, 10**6),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (278, 4, 10**6),
        (279, 4, 256),
    ]
    body = b"II" + struct.pack("<HI", 42, 8 + 256) + bytes(range(256)) + struct.pack("<H", len(entries))
    for tag, typ, value in entries:
        body += struct.pack("<HHI", tag, typ, 1) + (
            struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        )
    path.write_bytes(body + b"\0\0\0\0")
    with pytest.raises(CorruptImageError, match="declares 1000000×1000000"):
        TiffHandle(path)
    assert str(path.resolve()) not in _open_fds()  # TiffFile was opened, then closed when parsing failed


def test_pipes_and_devices_are_named_not_called_empty(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "stream.svs"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedFormatError, match="named pipe"):
        open_image(fifo)  # returns at once: a FIFO is never opened
    with pytest.raises(UnsupportedFormatError, match="device"):
        open_image("/dev/zero")


def test_fingerprint_sees_a_same_size_edit_in_the_middle(tmp_path: Path) -> None:
    from lpfm_toolkit.sources.local import file_fingerprint

    path = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(bytes(data))
    before = file_fingerprint(path)
    data[len(data) // 2] ^= 1  # far from the first and last MiB
    path.write_bytes(bytes(data))
    assert file_fingerprint(path) != before


def test_nonsense_pixel_size_in_a_file_is_treated_as_unknown(tmp_path: Path) -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    path = tmp_path / "neg.ome.tiff"
    tifffile.imwrite(
        path, img, photometric="rgb", ome=True, metadata={"axes": "YXS", "PhysicalSizeX": -0.5, "PhysicalSizeY": -0.5}
    )
    with open_image(path) as h:
        assert h.mpp is None
