"""The readers besides Bio-Formats: tifffile, napari's multiscale view through tifffile, tiffslide and OpenSlide.

These need no Java and run everywhere. The README's "what reads our outputs" table cites these tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
import zarr
from ome_types import from_xml

from lpfm_toolkit.imageops import downsample2
from lpfm_toolkit.provenance import NAMESPACE, Provenance
from lpfm_toolkit.sinks.base import OutputSpec
from lpfm_toolkit.sinks.ometiff import OmeTiffSink, read_provenance

RGB = ["R", "G", "B"]
# name → (channels, dtype, compression); 600×400 at tile 128 → 4 levels
KINDS = {
    "rgb8-zstd": (RGB, "uint8", "zstd"),
    "rgb8-jpeg": (RGB, "uint8", "jpeg"),
    "1ch-uint8": (["Hematoxylin"], "uint8", "zlib"),
    "2ch-uint16": (["DAPI", "FITC"], "uint16", "zlib"),
    "1ch-float32": (["restored"], "float32", "zstd"),
}
SIZES = [(600, 400), (300, 200), (150, 100), (75, 50)]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray, str]]:
    root = tmp_path_factory.mktemp("readers")
    rng = np.random.default_rng(11)
    made = {}
    for name, (channels, dtype, comp) in KINDS.items():
        yy, xx = np.mgrid[0:400, 0:600]
        smooth = np.stack([(np.sin(xx / 19 + i) * np.cos(yy / 23)) for i in range(len(channels))], -1)
        base = 0.5 + 0.4 * smooth + 0.05 * rng.standard_normal(smooth.shape)
        img = (base * (1 if dtype == "float32" else np.iinfo(dtype).max * 0.9)).astype(dtype)
        spec = OutputSpec(name, 600, 400, channels, np.dtype(dtype), (0.25, 0.25))
        key = f"{name:k<64}"
        with OmeTiffSink(root / name, tile=128, compression=comp).open(spec, key, {"system": "memory"}) as w:
            w.write_rows(img)
            ref = w.commit(
                Provenance(
                    source={"system": "memory"},
                    prompt="denoise",
                    task={"kind": "denoise"},
                    engine={"name": "identity"},
                    seed=0,
                    idempotency_key=key,
                )
            )
        made[name] = (Path(ref.uri), img, comp)
    return made


def _levels(img: np.ndarray) -> list[np.ndarray]:
    out = [img]
    for _ in SIZES[1:]:
        out.append(downsample2(out[-1]))
    return out


@pytest.mark.parametrize("name", list(KINDS))
def test_tifffile_reads_every_level_channels_and_provenance(outputs: dict, name: str) -> None:
    path, img, comp = outputs[name]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert len(series.levels) == len(SIZES)
        ome = from_xml(tif.ome_metadata)
        for level, want in zip(series.levels, _levels(img)):
            got = level.asarray()
            got = (
                got
                if img.shape[2] == 3 and img.dtype == np.uint8
                else np.moveaxis(got.reshape((img.shape[2],) + got.shape[-2:]), 0, -1)
            )
            assert got.shape == want.shape
            if comp != "jpeg":
                np.testing.assert_array_equal(got, want)
    pixels = ome.images[0].pixels
    assert pixels.physical_size_x == pytest.approx(0.25) and pixels.physical_size_x_unit.value == "µm"
    if img.shape[2] != 3 or img.dtype != np.uint8:
        assert [c.name for c in pixels.channels] == KINDS[name][0]
    assert ome.structured_annotations.map_annotations[0].namespace == NAMESPACE
    assert read_provenance(path).prompt == "denoise"


@pytest.mark.parametrize("name", list(KINDS))
def test_napari_multiscale_through_tifffile_zarr(outputs: dict, name: str) -> None:
    """napari opens a pyramid as the list of levels of tifffile's zarr store (``imread(..., aszarr=True)``)."""
    path, img, comp = outputs[name]
    group = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    datasets = [group[str(i)] for i in range(len(SIZES))]  # multiscales: "0" is full resolution
    rgb = img.shape[2] == 3 and img.dtype == np.uint8
    for arr, (w, h) in zip(datasets, SIZES):
        assert arr.shape == ((h, w, 3) if rgb else (h, w) if img.shape[2] == 1 else (img.shape[2], h, w))
        assert arr.dtype == img.dtype
    full = np.asarray(datasets[0][:])
    with tifffile.TiffFile(path) as tif:
        np.testing.assert_array_equal(full, tif.series[0].asarray())


@pytest.mark.parametrize("name", list(KINDS))
def test_tiffslide_reads_every_level_and_pixel_size(outputs: dict, name: str) -> None:
    path, img, comp = outputs[name]
    slide = tiffslide.TiffSlide(path)
    assert slide.level_dimensions == tuple(SIZES)
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
    for level, want in zip((0, len(SIZES) - 1), (_levels(img)[0], _levels(img)[-1])):
        got = slide.read_region((0, 0), level, SIZES[level], as_array=True)
        assert got.shape == want.shape and got.dtype == want.dtype
        if comp != "jpeg":
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["rgb8-zstd", "rgb8-jpeg", "1ch-uint8"])
def test_openslide_reads_full_resolution_of_8bit_outputs(outputs: dict, name: str) -> None:
    """OpenSlide 4 opens our OME-TIFF as a generic TIFF: full resolution only (it does not read SubIFDs)."""
    path, img, comp = outputs[name]
    slide = openslide.OpenSlide(path)
    assert slide.level_count == 1 and slide.dimensions == SIZES[0]
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    got = np.asarray(slide.read_region((0, 0), 0, SIZES[0]))[:, :, :3]
    want = img if img.shape[2] == 3 else np.repeat(img, 3, axis=2)
    if comp == "jpeg":
        with tifffile.TiffFile(path) as tif:
            want = tif.series[0].asarray()
    np.testing.assert_array_equal(got, want)
    slide.close()
