"""Every kind of OME-TIFF we write, opened by Bio-Formats the way QuPath and OMERO open it.

For each output: the OME-TIFF reader is chosen (not the plain TIFF fallback), the resolutions are our pyramid,
SizeC/Z/T, channel names, pixel type and RGB-ness are what we wrote, the physical pixel size and its unit are
right, the provenance MapAnnotation (and the JSON CommentAnnotation) arrive in Bio-Formats' OME-XML, and the
pixels at level 0 and at the smallest level equal what we wrote (lossless) or tifffile's decode (JPEG).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from lpfm_toolkit.engine.base import EngineOutput, IdentityEngine
from lpfm_toolkit.imageops import downsample2
from lpfm_toolkit.pipeline import plan, run_item
from lpfm_toolkit.prompts import parse_prompt
from lpfm_toolkit.provenance import NAMESPACE, Provenance
from lpfm_toolkit.sinks.base import OutputSpec
from lpfm_toolkit.sinks.ometiff import JSON_NAMESPACE, OME_PIXEL_TYPES, OmeTiffSink
from lpfm_toolkit.sources import Region, open_image

pytestmark = pytest.mark.bioformats

RGB = ["R", "G", "B"]
UNICODE_DIR = "ünï µ×→ 日本語"
UNICODE_CHANNELS = ["µ-DAPI", "×FITC", "→Cy5", "über", "細胞核"]


@dataclass
class Case:
    """One file we wrote and what Bio-Formats must report for it."""

    path: Path
    name: str
    channels: list[str]
    dtype: np.dtype
    mpp: tuple[float, float] | None
    levels: list[list[int]]
    summary: dict[str, str]
    idempotency_key: str
    level0: np.ndarray  # (H, W, C) as written
    lossless: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rgb(self) -> bool:
        return self.channels == RGB and self.dtype == np.uint8


def _prov(key: str, prompt: str = "denoise") -> Provenance:
    return Provenance(
        source={"system": "memory", "uri": "memory://conformance"},
        prompt=prompt,
        task={"kind": "denoise", "scale": 1},
        engine={"name": "identity"},
        seed=7,
        idempotency_key=key,
    )


def _image(shape: tuple[int, int, int], dtype: str, seed: int) -> np.ndarray:
    """Smooth structure plus noise: realistic for codecs, exact for lossless round trips."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (17 + 5 * i)) * np.cos(yy / (23 + 3 * i)) for i in range(c)], -1)
    base = 0.5 + 0.35 * base + 0.1 * rng.standard_normal(shape)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (base * 1000 - 300).astype(dt)
    info = np.iinfo(dt)
    return np.clip(info.min + base * (float(info.max) - info.min), info.min, info.max).astype(dt)


def _direct(
    folder: Path,
    key: str,
    img: np.ndarray,
    channels: list[str],
    *,
    mpp: tuple[float, float] | None = None,
    compression: str = "zlib",
    tile: int = 128,
    name: str = "result",
    path: Path | None = None,
    prompt: str = "denoise",
    uncertainty: np.ndarray | None = None,
    stripes: int | None = None,
    **jpeg: Any,
) -> Case:
    h, w = img.shape[:2]
    spec = OutputSpec(name, w, h, channels, img.dtype, mpp, uncertainty=uncertainty is not None)
    sink = (
        OmeTiffSink(path=path, compression=compression, tile=tile, **jpeg)
        if path
        else OmeTiffSink(folder, compression=compression, tile=tile, **jpeg)
    )
    with sink.open(spec, key, {"system": "memory"}) as writer:
        if stripes:
            for x in range(0, w, stripes):
                for y in range(0, h, 97):
                    writer.write_block(
                        x,
                        img[y : y + 97, x : x + stripes],
                        None if uncertainty is None else uncertainty[y : y + 97, x : x + stripes],
                    )
        else:
            for y in range(0, h, 97):
                writer.write_rows(img[y : y + 97], None if uncertainty is None else uncertainty[y : y + 97])
        ref = writer.commit(_prov(key, prompt))
    return Case(
        Path(ref.uri),
        name,
        channels,
        img.dtype,
        mpp,
        ref.extra["levels"],
        ref.provenance.summary(),
        key,
        img,
        ref.provenance.output["compression"] != "jpeg",
        extra=ref.extra,
    )


def _uncertainty_case(main: Case, unc: np.ndarray) -> Case:
    return Case(
        Path(main.extra["uncertainty"]),
        main.name + " uncertainty",
        ["uncertainty"],
        np.dtype(np.float32),
        main.mpp,
        main.levels,
        main.summary,
        main.idempotency_key,
        unc,
        True,
    )


def _pipeline(sample_slide: Path, folder: Path, prompt: str, region: Region, engine: Any, **kw: Any) -> Any:
    with open_image(sample_slide) as h:
        item = plan(h, parse_prompt(prompt), region=region)[0]
        res = run_item(
            h, item, engine, OmeTiffSink(folder, compression="zlib", tile=128), tile_size=128, overlap=16, **kw
        )
        src = h.read_region(0, region.x, region.y, region.width, region.height)
    return res, src


class _ConstantUncertainty(IdentityEngine):
    def process(self, tiles, task, seeds):  # type: ignore[no-untyped-def]
        out = super().process(tiles, task, seeds)
        return EngineOutput(out.pixels, np.full(out.pixels.shape[:3] + (1,), 0.25, np.float32))


def _build_cases(root: Path, sample_slide: Path) -> dict[str, Case]:
    cases: dict[str, Case] = {}
    rgb = _image((400, 600, 3), "uint8", 1)
    for comp in ("jpeg", "zlib", "zstd", "lzw", "none", "auto"):
        cases[f"rgb8-{comp}"] = _direct(
            root / comp, f"{comp:a<64}", rgb, RGB, mpp=(0.25, 0.25), compression=comp, name=f"H&E {comp}"
        )
    cases["rgb8-jpeg-q90-420"] = _direct(
        root / "jpeg420",
        "j" * 64,
        rgb,
        RGB,
        mpp=(0.25, 0.25),
        compression="jpeg",
        jpeg_quality=90,
        jpeg_subsampling="4:2:0",
    )
    cases["rgb8-no-pixel-size"] = _direct(root / "nompp", "n" * 64, rgb, RGB, mpp=None)
    cases["1ch-uint8"] = _direct(
        root / "c1", "b" * 64, _image((300, 420, 1), "uint8", 2), ["Hematoxylin"], mpp=(0.5, 0.5)
    )
    cases["2ch-uint16"] = _direct(
        root / "c2", "c" * 64, _image((300, 420, 2), "uint16", 3), ["DAPI", "FITC"], mpp=(0.325, 0.325)
    )
    cases["3ch-uint16"] = _direct(
        root / "c3",
        "d" * 64,
        _image((260, 300, 3), "uint16", 4),
        ["CD3", "CD8", "PanCK"],
        mpp=(0.5, 0.5),
        compression="zstd",
    )
    cases["3ch-uint8-not-rgb"] = _direct(
        root / "c3b", "e" * 64, _image((260, 300, 3), "uint8", 5), ["Hoechst", "GFP", "mCherry"], compression="lzw"
    )
    cases["5ch-uint8"] = _direct(
        root / "c5",
        "f" * 64,
        _image((200, 300, 5), "uint8", 6),
        ["DAPI", "CD3", "CD20", "PanCK", "Ki67"],
        mpp=(0.5, 0.5),
        compression="lzw",
    )
    # --compression jpeg on 8-bit images that are not RGB: grey JPEG tiles, one plane per channel
    cases["1ch-uint8-jpeg"] = _direct(
        root / "c1j", "p" * 64, _image((300, 420, 1), "uint8", 8), ["Hematoxylin"], mpp=(0.5, 0.5), compression="jpeg"
    )
    cases["3ch-uint8-jpeg-not-rgb"] = _direct(
        root / "c3j", "q" * 64, _image((260, 300, 3), "uint8", 9), ["Hoechst", "GFP", "mCherry"], compression="jpeg"
    )
    cases["float32"] = _direct(
        root / "f32", "g" * 64, _image((300, 280, 1), "float32", 7), ["restored"], compression="zstd"
    )
    for i, dt in enumerate(("int8", "int16", "int32", "uint32", "float64")):
        cases[dt] = _direct(root / dt, f"{dt:h<64}", _image((200, 260, 2), dt, 10 + i), ["a", "b"], mpp=(1.0, 1.0))
    # non-ASCII in folder, file, image and channel names and in the prompt
    uni = root / UNICODE_DIR
    uni.mkdir()
    cases["unicode"] = _direct(
        uni,
        "u" * 64,
        _image((200, 300, 5), "uint16", 20),
        UNICODE_CHANNELS,
        mpp=(0.25, 0.25),
        name="slide µ × → ü 細胞",
        path=uni / "résultat µ×→ü 細胞.ome.tiff",
        prompt="AF → H&E ×2 für µ 細胞",
    )
    # x.ome.tif (one f) with its uncertainty image
    unc = np.random.default_rng(30).random((300, 400, 1), dtype=np.float32)
    one_f = _direct(
        root / "onef",
        "o" * 64,
        _image((300, 400, 3), "uint8", 31),
        RGB,
        mpp=(0.5, 0.5),
        path=root / "onef" / "result.ome.tif",
        uncertainty=unc,
    )
    cases["ome-tif-one-f"] = one_f
    cases["ome-tif-one-f-uncertainty"] = _uncertainty_case(one_f, unc)
    # a wide result written in vertical stripes, deeper pyramid (coarse levels built at commit)
    cases["wide-striped"] = _direct(
        root / "wide",
        "w" * 64,
        _image((300, 4500, 3), "uint8", 32),
        RGB,
        mpp=(0.25, 0.25),
        tile=256,
        compression="zstd",
        stripes=2048,
    )
    # through the pipeline: super-resolution (pixel size ÷ scale) and an uncertainty map
    res, src = _pipeline(sample_slide, root / "sr", "sr x2", Region(500, 700, 300, 200), IdentityEngine())
    cases["pipeline-sr-x2"] = Case(
        Path(res.output.uri),
        res.provenance.output["name"],
        RGB,
        np.dtype(np.uint8),
        (0.499 / 2, 0.499 / 2),
        res.output.extra["levels"],
        res.provenance.summary(),
        res.provenance.idempotency_key,
        src.repeat(2, 0).repeat(2, 1),
        True,
    )
    res, src = _pipeline(
        sample_slide, root / "unc", "denoise", Region(0, 0, 300, 200), _ConstantUncertainty(), samples_uncertainty=True
    )
    main = Case(
        Path(res.output.uri),
        res.provenance.output["name"],
        RGB,
        np.dtype(np.uint8),
        (0.499, 0.499),
        res.output.extra["levels"],
        res.provenance.summary(),
        res.provenance.idempotency_key,
        src,
        True,
        extra=res.output.extra,
    )
    cases["pipeline-denoise"] = main
    cases["pipeline-uncertainty"] = _uncertainty_case(main, np.full((200, 300, 1), 0.25, np.float32))
    return cases


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory, sample_slide: Path, bioformats: Any) -> dict[str, tuple]:
    """Every case written, then probed by Bio-Formats in one JVM: name → (case, what Bio-Formats saw)."""
    root = tmp_path_factory.mktemp("outputs")
    cases = _build_cases(root, sample_slide)
    views = bioformats.probe([c.path for c in cases.values()], tmp_path_factory.mktemp("probe"))
    return {name: (case, view) for (name, case), view in zip(cases.items(), views)}


CASES = [
    "rgb8-jpeg",
    "rgb8-zlib",
    "rgb8-zstd",
    "rgb8-lzw",
    "rgb8-none",
    "rgb8-auto",
    "rgb8-jpeg-q90-420",
    "rgb8-no-pixel-size",
    "1ch-uint8",
    "2ch-uint16",
    "3ch-uint16",
    "3ch-uint8-not-rgb",
    "1ch-uint8-jpeg",
    "3ch-uint8-jpeg-not-rgb",
    "5ch-uint8",
    "float32",
    "int8",
    "int16",
    "int32",
    "uint32",
    "float64",
    "unicode",
    "ome-tif-one-f",
    "ome-tif-one-f-uncertainty",
    "wide-striped",
    "pipeline-sr-x2",
    "pipeline-denoise",
    "pipeline-uncertainty",
]


def _get(seen: dict[str, tuple], name: str) -> tuple[Case, Any]:
    case, view = seen[name]
    assert "error" not in view.info, f"Bio-Formats could not open {case.path.name}: {view.info.get('error')}"
    return case, view


@pytest.mark.parametrize("name", CASES)
def test_ome_tiff_reader_and_full_pyramid(seen: dict[str, tuple], name: str) -> None:
    case, view = _get(seen, name)
    assert view["reader"] == "loci.formats.in.OMETiffReader" and view["format"] == "OME-TIFF"
    assert view["series_count"] == 1  # reduced levels are resolutions of one series, not extra series
    assert view["resolution_count"] == len(case.levels)
    assert view["levels"] == case.levels
    with tifffile.TiffFile(case.path) as tif:  # our pyramid depth, as we wrote it
        assert [
            [lv.shape[-1 if not case.rgb else 1], lv.shape[-2 if not case.rgb else 0]] for lv in tif.series[0].levels
        ] == case.levels
    assert view["image_name"] == case.name


@pytest.mark.parametrize("name", CASES)
def test_channels_pixel_type_and_dimensions(seen: dict[str, tuple], name: str) -> None:
    case, view = _get(seen, name)
    assert (view["size_x"], view["size_y"]) == tuple(case.levels[0])
    assert (view["size_c"], view["size_z"], view["size_t"]) == (len(case.channels), 1, 1)
    assert view["pixel_type"] == OME_PIXEL_TYPES[case.dtype.name]
    assert view["is_rgb"] is case.rgb
    if case.rgb:  # one interleaved RGB channel; QuPath shows its default Red/Green/Blue
        assert view["meta_channel_count"] == 1 and view["samples_per_pixel"] == [3]
    else:  # QuPath takes these names only when the metadata's channel count equals SizeC
        assert view["meta_channel_count"] == view["size_c"]
        assert view["channel_names"] == case.channels
        assert view["samples_per_pixel"] == [1] * len(case.channels)


@pytest.mark.parametrize("name", CASES)
def test_physical_pixel_size_and_unit(seen: dict[str, tuple], name: str) -> None:
    case, view = _get(seen, name)
    if case.mpp is None:
        assert view["physical_size_x"] is None and view["physical_size_y"] is None
    else:
        assert view["physical_size_unit"] == "µm"
        assert view["pixel_width_um"] == pytest.approx(case.mpp[0], rel=1e-9)
        assert view["pixel_height_um"] == pytest.approx(case.mpp[1], rel=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_provenance_annotations_reach_bioformats(seen: dict[str, tuple], name: str) -> None:
    case, view = _get(seen, name)
    assert view.map_annotations.get(NAMESPACE) == case.summary
    comments = {c["namespace"]: c["value"] for c in view["comment_annotations"]}
    assert json.loads(comments[JSON_NAMESPACE])["idempotency_key"] == case.idempotency_key
    assert NAMESPACE in view.ome_xml and case.idempotency_key in view.ome_xml  # what OMERO import stores


def _layout(img: np.ndarray, rgb: bool) -> np.ndarray:
    """(H, W, C) → Bio-Formats' layout in :meth:`BioFormatsView.pixels`."""
    return img if rgb else img.transpose(2, 0, 1)


@pytest.mark.parametrize("name", CASES)
def test_pixels_at_full_and_smallest_level(seen: dict[str, tuple], name: str) -> None:
    case, view = _get(seen, name)
    last = len(case.levels) - 1
    with tifffile.TiffFile(case.path) as tif:
        decoded = [tif.series[0].levels[i].asarray() for i in (0, last)]
    if case.lossless:
        expected = [case.level0, case.level0]
        for _ in range(last):
            expected[1] = downsample2(expected[1])
        expected = [_layout(e, case.rgb) for e in expected]
        for ours, theirs in zip(expected, decoded):  # tifffile agrees with what we wrote
            np.testing.assert_array_equal(theirs.reshape(ours.shape), ours)
    else:  # JPEG: Bio-Formats must decode exactly as tifffile (libjpeg-turbo) does
        expected = [d if case.rgb else d.reshape((len(case.channels),) + d.shape[-2:]) for d in decoded]
    for resolution, want in zip((0, last), expected):
        got = view.pixels(resolution)
        assert got.shape == want.shape and got.dtype == want.dtype
        if np.issubdtype(got.dtype, np.floating):
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got, want)


def test_jpeg_stays_close_to_what_was_written(seen: dict[str, tuple]) -> None:
    """The JPEG cases above compare Bio-Formats with tifffile; here the decode with the pixels we wrote.

    Measured on this (deliberately noisy) image: 42.3 dB for q95 4:4:4 and 21.7 dB for q90 4:2:0, the latter
    what libjpeg-turbo itself gives without tiles. A wrong colour conversion (Bio-Formats on YCbCr 4:4:4) is ~12 dB.
    """
    for name, min_db in (("rgb8-jpeg", 40.0), ("rgb8-jpeg-q90-420", 20.0)):
        case, view = _get(seen, name)
        err = view.pixels(0).astype(np.float64) - case.level0
        psnr = 10 * np.log10(255.0**2 / np.mean(err**2))
        assert psnr > min_db, f"{name}: {psnr:.1f} dB"


def test_unicode_survives_in_path_names_and_prompt(seen: dict[str, tuple]) -> None:
    case, view = _get(seen, "unicode")
    assert UNICODE_DIR in view["file"] and "細胞" in Path(view["file"]).name
    assert view["channel_names"] == UNICODE_CHANNELS and view["image_name"] == "slide µ × → ü 細胞"
    assert view.map_annotations[NAMESPACE]["lpfm.prompt"] == "AF → H&E ×2 für µ 細胞"
