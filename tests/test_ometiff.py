"""The OME-TIFF sink: pyramid in SubIFDs, pixel size, OME-XML validity, provenance, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
from ome_types import from_xml

from lpfm_toolkit.engine.base import EngineOutput, IdentityEngine
from lpfm_toolkit.errors import OutputExistsError
from lpfm_toolkit.pipeline import plan, run_item
from lpfm_toolkit.prompts import Task, TaskKind, parse_prompt
from lpfm_toolkit.provenance import NAMESPACE
from lpfm_toolkit.sinks.ometiff import OmeTiffSink, n_pyramid_levels, read_provenance
from lpfm_toolkit.sources import Region, open_image

REGION = Region(500, 700, 600, 400)


def _run(sample_slide: Path, out: Path, prompt: str = "sr x2", region: Region = REGION, engine=None, **kw):
    with open_image(sample_slide) as h:
        item = plan(h, parse_prompt(prompt), region=region)[0]
        return run_item(h, item, engine or IdentityEngine(), OmeTiffSink(out, **kw), tile_size=128, overlap=16)


def test_pyramid_levels_size_and_pixel_size(sample_slide: Path, tmp_path: Path) -> None:
    res = _run(sample_slide, tmp_path, compression="zlib", tile=256)
    path = Path(res.output.uri)
    assert path.name.endswith(".ome.tiff")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        # halved until the coarsest level fits one 256 px tile
        assert [lv.shape for lv in series.levels] == [(800, 1200, 3), (400, 600, 3), (200, 300, 3), (100, 150, 3)]
        assert len(tif.pages) == 1  # reduced levels live in SubIFDs, not as top-level pages
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        full = series.asarray()
    with open_image(sample_slide) as h:
        expected = h.read_region(0, 500, 700, 600, 400).repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(full, expected)  # zlib is lossless
    slide = tiffslide.TiffSlide(path)
    assert slide.level_dimensions == ((1200, 800), (600, 400), (300, 200), (150, 100))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499 / 2)
    with open_image(path) as back:
        assert back.mpp == pytest.approx((0.2495, 0.2495))
        assert len(back.levels) == 4


def test_ome_xml_validates_and_carries_provenance(sample_slide: Path, tmp_path: Path) -> None:
    res = _run(sample_slide, tmp_path, compression="jpeg")
    path = Path(res.output.uri)
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
        assert tif.pages[0].compression == 7  # JPEG
    ome = from_xml(xml, validate=True)
    pixels = ome.images[0].pixels
    assert (pixels.size_x, pixels.size_y, pixels.size_c) == (1200, 800, 3)
    assert pixels.physical_size_x == pytest.approx(0.2495)
    (map_ann,) = ome.structured_annotations.map_annotations
    assert map_ann.namespace == NAMESPACE
    kv = {m.k: m.value for m in map_ann.value.ms}
    assert kv["lpfm.task"] == "super_resolution" and kv["lpfm.task.scale"] == "2"
    assert kv["lpfm.idempotency_key"] == res.provenance.idempotency_key
    # how the pixels were stored is in the summary that OMERO and QuPath users see, not only in the sidecar
    assert (kv["lpfm.output.compression"], kv["lpfm.output.jpeg_quality"], kv["lpfm.output.jpeg_subsampling"]) == (
        "jpeg", "98", "4:4:4")
    sidecar = json.loads(Path(res.output.extra["sidecar"]).read_text())
    assert sidecar["idempotency_key"] == res.provenance.idempotency_key
    assert sidecar["source"]["region"] == [500, 700, 600, 400]
    assert sidecar["output"]["uri"] == str(path.resolve())
    # provenance readable from the TIFF alone once the sidecar is gone
    Path(res.output.extra["sidecar"]).unlink()
    assert read_provenance(path).idempotency_key == res.provenance.idempotency_key


def test_rerun_is_skipped_and_force_recomputes(sample_slide: Path, tmp_path: Path) -> None:
    first = _run(sample_slide, tmp_path)
    again = _run(sample_slide, tmp_path)
    assert again.skipped and again.output.uri == first.output.uri
    assert len(list(tmp_path.glob("*.ome.tiff"))) == 1
    other_seedless_task = _run(sample_slide, tmp_path, prompt="super-resolve by 2")  # same work, other words
    assert other_seedless_task.skipped


def test_explicit_path_refuses_foreign_file(sample_slide: Path, tmp_path: Path) -> None:
    target = tmp_path / "result.ome.tiff"
    with open_image(sample_slide) as h:
        item = plan(h, Task(TaskKind.DENOISE), region=Region(0, 0, 200, 200))[0]
        run_item(h, item, IdentityEngine(), OmeTiffSink(path=target))
        item2 = plan(h, Task(TaskKind.DENOISE), region=Region(10, 0, 200, 200))[0]
        with pytest.raises(OutputExistsError, match="different run"):
            run_item(h, item2, IdentityEngine(), OmeTiffSink(path=target))
        run_item(h, item2, IdentityEngine(), OmeTiffSink(path=target, overwrite=True), force=True)
    assert read_provenance(target).source["region"] == [10, 0, 200, 200]


def test_interrupted_run_leaves_nothing(sample_slide: Path, tmp_path: Path) -> None:
    class Boom(IdentityEngine):
        calls = 0

        def process(self, tiles, task, seeds):  # type: ignore[override]
            Boom.calls += 1
            if Boom.calls == 5:
                raise KeyboardInterrupt
            return super().process(tiles, task, seeds)

    with pytest.raises(KeyboardInterrupt):
        _run(sample_slide, tmp_path, engine=Boom())
    assert list(tmp_path.iterdir()) == []


def test_never_writes_over_the_original(sample_slide: Path, tmp_path: Path) -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    src = tmp_path / "orig.ome.tiff"
    tifffile.imwrite(src, img, ome=True, photometric="rgb")
    before = src.read_bytes()
    with open_image(src) as h:
        item = plan(h, Task(TaskKind.DENOISE))[0]
        with pytest.raises(OutputExistsError, match="original"):
            run_item(h, item, IdentityEngine(), OmeTiffSink(path=src, overwrite=True), force=True)
    assert src.read_bytes() == before


def test_multichannel_16bit_and_uncertainty(tmp_path: Path) -> None:
    from lpfm_toolkit.sinks.base import OutputSpec

    rng = np.random.default_rng(0)
    img = rng.integers(0, 65535, (300, 500, 2), dtype=np.uint16)
    unc = rng.random((300, 500, 1), dtype=np.float32)
    spec = OutputSpec("fluo", 500, 300, ["DAPI", "FITC"], np.dtype(np.uint16), (0.3, 0.3), uncertainty=True)
    sink = OmeTiffSink(tmp_path, tile=128)
    from lpfm_toolkit.provenance import Provenance

    prov = Provenance(source={"system": "file"}, prompt="denoise", task={"kind": "denoise"}, engine={"name": "x"},
                      seed=0, idempotency_key="k" * 64)
    with sink.open(spec, "k" * 64, {"system": "memory"}) as w:
        for y in range(0, 300, 70):
            w.write_rows(img[y : y + 70], unc[y : y + 70])
        ref = w.commit(prov)
    with tifffile.TiffFile(ref.uri) as tif:
        assert len(tif.pages) == 2  # one page per channel, each with its SubIFDs
        series = tif.series[0]
        assert series.axes == "CYX" and len(series.levels) == n_pyramid_levels(500, 300, 128)
        np.testing.assert_array_equal(series.asarray(), img.transpose(2, 0, 1))
        ome = from_xml(tif.ome_metadata, validate=True)
        assert [c.name for c in ome.images[0].pixels.channels] == ["DAPI", "FITC"]
    with tifffile.TiffFile(ref.extra["uncertainty"]) as tif:
        np.testing.assert_allclose(tif.series[0].asarray(), unc[:, :, 0])


def test_engine_output_with_uncertainty_streams_to_second_file(sample_slide: Path, tmp_path: Path) -> None:
    class Noisy(IdentityEngine):
        def process(self, tiles, task, seeds):  # type: ignore[override]
            out = super().process(tiles, task, seeds)
            return EngineOutput(out.pixels, np.full(out.pixels.shape[:3] + (1,), 0.25, np.float32))

    with open_image(sample_slide) as h:
        item = plan(h, Task(TaskKind.DENOISE), region=Region(0, 0, 300, 200))[0]
        res = run_item(h, item, Noisy(), OmeTiffSink(tmp_path), tile_size=128, overlap=16, samples_uncertainty=True)
    u = tifffile.imread(res.output.extra["uncertainty"])
    np.testing.assert_allclose(u, 0.25, atol=1e-6)


@pytest.mark.parametrize(("compression", "dtype", "channels"), [
    ("jpeg", np.uint8, 3), ("zlib", np.uint8, 3), ("zstd", np.uint16, 1), ("lzw", np.uint16, 2),
    ("none", np.uint8, 3), ("jpeg", np.uint8, 1), ("zlib", np.float32, 1),
])
def test_tiles_are_compressed_exactly_as_tifffile_would(tmp_path: Path, compression: str, dtype: type,
                                                        channels: int) -> None:
    """The writer compresses tiles itself; each must be the byte string tifffile writes for the same image."""
    from lpfm_toolkit.sinks.base import OutputSpec
    from lpfm_toolkit.sinks.ometiff import JPEG_QUALITY, JPEG_SUBSAMPLING, OmeTiffWriter

    rng = np.random.default_rng(3)
    img = (rng.random((300, 700, channels)) * (1 if dtype == np.float32 else 200)).astype(dtype)
    names = ["R", "G", "B"] if channels == 3 else [f"C{i}" for i in range(channels)]
    spec = OutputSpec("t", 700, 300, names, np.dtype(dtype), None)
    w = OmeTiffWriter(tmp_path / "ours.ome.tiff", spec, 256, compression)
    w.write_rows(img)
    w._img.finish()
    rgb = channels == 3
    reference = tmp_path / "reference.tif"
    comp = None if compression == "none" else compression
    with tifffile.TiffWriter(reference) as tw:  # one page per plane, as the writer lays them out
        for plane in [img] if rgb else [img[:, :, c] for c in range(channels)]:
            jpeg: dict = {"compressionargs": {"level": JPEG_QUALITY}} if compression == "jpeg" else {}
            if jpeg and rgb:
                jpeg["subsampling"] = {"4:4:4": (1, 1), "4:2:2": (2, 1), "4:2:0": (2, 2)}[JPEG_SUBSAMPLING]
                jpeg["compressionargs"]["outcolorspace"] = "RGB" if JPEG_SUBSAMPLING == "4:4:4" else "YCBCR"
            tw.write(plane, tile=(256, 256), compression=comp, photometric="rgb" if rgb else "minisblack",
                     metadata=None, **jpeg)
    expected = []
    with tifffile.TiffFile(reference) as tif:
        for page in tif.pages:
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                tif.filehandle.seek(offset)
                expected.append(tif.filehandle.read(count))
    ours = [data for plane in w._img.planes for data, _ in w._img.tiles(plane, 0)]
    assert ours == expected
    w.abort()


def test_stripes_and_full_rows_give_the_same_file(tmp_path: Path) -> None:
    """A wide image written in 2048-px stripes equals the one written as full rows, at every level."""
    from lpfm_toolkit.provenance import Provenance
    from lpfm_toolkit.sinks.base import OutputSpec
    from lpfm_toolkit.sinks.ometiff import OmeTiffWriter

    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, (1301, 5000, 3), dtype=np.uint8)
    spec = OutputSpec("wide", 5000, 1301, ["R", "G", "B"], np.dtype(np.uint8), (0.5, 0.5), uncertainty=True)
    unc = rng.random((1301, 5000, 1), dtype=np.float32)
    prov = Provenance(source={}, prompt="p", task={}, engine={}, seed=0, idempotency_key="k")
    full = OmeTiffWriter(tmp_path / "full.ome.tiff", spec, 256, "zlib")
    for y in range(0, 1301, 100):
        full.write_rows(img[y : y + 100], unc[y : y + 100])
    full.commit(prov)
    striped = OmeTiffWriter(tmp_path / "striped.ome.tiff", spec, 256, "zlib")
    assert striped.column_alignment == 2048
    for x in range(0, 5000, 2048):
        for y in range(0, 1301, 77):
            striped.write_block(x, img[y : y + 77, x : x + 2048], unc[y : y + 77, x : x + 2048])
    striped.commit(prov)
    for a, b in [("full.ome.tiff", "striped.ome.tiff"), ("full.uncertainty.ome.tiff", "striped.uncertainty.ome.tiff")]:
        with tifffile.TiffFile(tmp_path / a) as ta, tifffile.TiffFile(tmp_path / b) as tb:
            la, lb = ta.series[0].levels, tb.series[0].levels
            assert len(la) == len(lb) == n_pyramid_levels(5000, 1301, 256) == 6
            for x, y in zip(la, lb):
                np.testing.assert_array_equal(x.asarray(), y.asarray())
    with tifffile.TiffFile(tmp_path / "striped.ome.tiff") as t:
        np.testing.assert_array_equal(t.series[0].asarray(), img)


def test_stripes_must_be_aligned_and_complete(tmp_path: Path) -> None:
    from lpfm_toolkit.sinks.base import OutputSpec
    from lpfm_toolkit.sinks.ometiff import OmeTiffWriter

    spec = OutputSpec("x", 5000, 100, ["R", "G", "B"], np.dtype(np.uint8), None)
    w = OmeTiffWriter(tmp_path / "x.ome.tiff", spec, 256, "zlib")
    with pytest.raises(ValueError, match="multiple of 2048"):
        w.write_block(1000, np.zeros((10, 1000, 3), np.uint8))
    w.write_block(0, np.zeros((10, 2048, 3), np.uint8))
    with pytest.raises(ValueError, match="ended after 10 of 100 rows"):
        w.write_block(2048, np.zeros((10, 2048, 3), np.uint8))
    w.abort()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("channels", "mpp"), [(["R", "G", "B"], (0.25, 0.5)), (["DAPI", "FITC ×"], None)])
def test_ome_xml_is_the_model_ome_types_itself_would_write(channels: list[str], mpp) -> None:
    """The ElementTree-built OME-XML parses to the same model as ome-types' own serialisation of it."""
    from ome_types import model as m

    from lpfm_toolkit.provenance import Provenance
    from lpfm_toolkit.sinks.base import OutputSpec
    from lpfm_toolkit.sinks.ometiff import JSON_NAMESPACE, build_ome_xml, validate_ome_xml

    rgb = channels == ["R", "G", "B"]
    dtype = np.dtype(np.uint8 if rgb else np.uint16)
    spec = OutputSpec("slide µ × <1> & 'x'", 300, 200, channels, dtype, mpp)
    prov = Provenance(source={"region": [1, 2, 3, 4], "uri": "a&b"}, prompt="sr x2 & <b> → é", task={"kind": "sr"},
                      engine={"name": "x"}, seed=3, idempotency_key="k")
    xml = build_ome_xml(spec, prov, channels, dtype, rgb)
    assert "&#" not in xml  # written as UTF-8: Bio-Formats' sanitiser breaks character references
    validate_ome_xml(xml)
    ours = from_xml(xml)
    pairs = [m.Map.M(k=k, value=v) for k, v in prov.summary().items()]
    phys = {"physical_size_x": mpp[0], "physical_size_x_unit": "µm", "physical_size_y": mpp[1],
            "physical_size_y_unit": "µm"} if mpp else {}
    chans = [m.Channel(id="Channel:0:0", name="RGB", samples_per_pixel=3)] if rgb else \
        [m.Channel(id=f"Channel:0:{i}", name=n, samples_per_pixel=1) for i, n in enumerate(channels)]
    tiffdata = [m.TiffData(ifd=0, plane_count=1)] if rgb else \
        [m.TiffData(ifd=i, first_c=i, plane_count=1) for i in range(len(channels))]
    reference = m.OME(
        creator=ours.creator,
        images=[m.Image(id="Image:0", name=spec.name, annotation_refs=[m.AnnotationRef(id="Annotation:0"),
                                                                          m.AnnotationRef(id="Annotation:1")],
                        pixels=m.Pixels(id="Pixels:0", dimension_order="XYCZT", type=dtype.name, size_x=300,
                                        size_y=200, size_c=len(channels), size_z=1, size_t=1, interleaved=rgb,
                                        big_endian=False, channels=chans, tiff_data_blocks=tiffdata, **phys))],
        structured_annotations=m.StructuredAnnotations(
            map_annotations=[m.MapAnnotation(id="Annotation:0", namespace="lpfm-toolkit/provenance",
                                             value=m.Map(ms=pairs))],
            comment_annotations=[m.CommentAnnotation(id="Annotation:1", namespace=JSON_NAMESPACE,
                                                     value=prov.to_json(indent=None))]))
    assert from_xml(reference.to_xml()) == ours
    with pytest.raises(ValueError):
        validate_ome_xml(xml.replace('SizeT="1"', 'SizeT="0"'))


def _prov(key: str = "k" * 64, prompt: str = "denoise"):
    from lpfm_toolkit.provenance import Provenance

    return Provenance(source={"system": "memory"}, prompt=prompt, task={"kind": "denoise"}, engine={"name": "x"},
                      seed=0, idempotency_key=key)


def test_ome_xml_is_stored_as_utf8_without_character_references(tmp_path: Path) -> None:
    """Regression (issue 9): ``&#181;m`` made Bio-Formats fall back to its plain TIFF reader."""
    from lpfm_toolkit.sinks.base import OutputSpec

    spec = OutputSpec("slide µ × → ü 細胞", 300, 200, ["DAPI µ", "FITC ×2"], np.dtype(np.uint16), (0.25, 0.25))
    with OmeTiffSink(tmp_path, tile=128).open(spec, "k" * 64, {"system": "memory"}) as w:
        w.write_rows(np.zeros((200, 300, 2), np.uint16))
        ref = w.commit(_prov(prompt="AF → H&E ×2"))
    with tifffile.TiffFile(ref.uri) as tif:
        raw = tif.pages[0].tags["ImageDescription"].value
        raw = raw.encode("utf-8") if isinstance(raw, str) else raw
        assert b"&#" not in raw
        assert 'PhysicalSizeXUnit="µm"'.encode() in raw and "細胞".encode() in raw
        ome = from_xml(tif.ome_metadata, validate=True)
    assert ome.images[0].pixels.physical_size_x_unit.value == "µm"
    assert [c.name for c in ome.images[0].pixels.channels] == ["DAPI µ", "FITC ×2"]
    assert read_provenance(ref.uri).prompt == "AF → H&E ×2"


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "uint8", "uint16", "uint32", "float32", "float64"])
def test_every_ome_pixel_type_is_written(tmp_path: Path, dtype: str) -> None:
    """Regression (issue 10): float64, int32 and int8 results failed with a bare KeyError at commit."""
    from lpfm_toolkit.sinks.base import OutputSpec
    from lpfm_toolkit.sinks.ometiff import OME_PIXEL_TYPES

    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    rng = np.random.default_rng(1)
    img = (rng.integers(info.min, info.max, (150, 260, 2), dtype=dtype, endpoint=True) if info is not None
           else rng.standard_normal((150, 260, 2)).astype(dtype) * 1e3)
    spec = OutputSpec("t", 260, 150, ["a", "b"], np.dtype(dtype), None)
    with OmeTiffSink(tmp_path, tile=64, compression="zlib").open(spec, "k" * 64, {"system": "memory"}) as w:
        w.write_rows(img)
        ref = w.commit(_prov())
    with tifffile.TiffFile(ref.uri) as tif:
        assert tif.series[0].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(tif.series[0].asarray(), img.transpose(2, 0, 1))
        assert from_xml(tif.ome_metadata).images[0].pixels.type.value == OME_PIXEL_TYPES[dtype]


def test_unsupported_dtype_is_one_clear_error(tmp_path: Path) -> None:
    from lpfm_toolkit.errors import ConfigError
    from lpfm_toolkit.sinks.base import OutputSpec

    spec = OutputSpec("t", 10, 10, ["a"], np.dtype(np.int64), None)
    with pytest.raises(ConfigError, match="cannot store int64"):
        OmeTiffSink(tmp_path).open(spec, "k" * 64, {"system": "memory"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("compression", "channels"), [("none", 3), ("none", 2)])
def test_compression_none_writes_the_pixels(tmp_path: Path, compression: str, channels: int) -> None:
    """Regression (issue 9): ``--compression none`` crashed on the way into tifffile."""
    from lpfm_toolkit.sinks.base import OutputSpec

    img = np.random.default_rng(2).integers(0, 255, (300, 500, channels), dtype=np.uint8)
    names = ["R", "G", "B"] if channels == 3 else ["a", "b"]
    spec = OutputSpec("t", 500, 300, names, np.dtype(np.uint8), (0.5, 0.5))
    with OmeTiffSink(tmp_path, tile=128, compression=compression).open(spec, "k" * 64, {}) as w:
        w.write_rows(img)
        ref = w.commit(_prov())
    with tifffile.TiffFile(ref.uri) as tif:
        assert tif.pages[0].compression == 1
        full = tif.series[0].asarray()
        smallest = tif.series[0].levels[-1].asarray()
    np.testing.assert_array_equal(full, img if channels == 3 else img.transpose(2, 0, 1))
    assert smallest.shape[-2 if channels == 3 else -1] == 500 // 4 + (500 % 4 > 0)
    assert ref.provenance.output["compression"] == "none"


def test_ome_tif_with_one_f_keeps_its_uncertainty_file(tmp_path: Path) -> None:
    """Regression (issue 10): for ``x.ome.tif`` the image was renamed over its uncertainty file."""
    from lpfm_toolkit.sinks.base import OutputSpec

    img = np.full((100, 120, 3), 200, np.uint8)
    unc = np.full((100, 120, 1), 0.5, np.float32)
    spec = OutputSpec("t", 120, 100, ["R", "G", "B"], np.dtype(np.uint8), None, uncertainty=True)
    target = tmp_path / "result.ome.tif"
    with OmeTiffSink(path=target, compression="zlib").open(spec, "k" * 64, {}) as w:
        w.write_rows(img, unc)
        ref = w.commit(_prov())
    assert ref.extra["uncertainty"] == str(tmp_path / "result.uncertainty.ome.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.lpfm.json", "result.ome.tif",
                                                          "result.uncertainty.ome.tif"]
    np.testing.assert_array_equal(tifffile.imread(target), img)
    np.testing.assert_array_equal(tifffile.imread(ref.extra["uncertainty"]), unc[:, :, 0])


def test_explicit_path_never_overwrites_a_file_that_is_not_ours(tmp_path: Path) -> None:
    from lpfm_toolkit.sinks.base import OutputSpec

    target = tmp_path / "mine.ome.tiff"
    target.write_bytes(b"a user's file")
    spec = OutputSpec("t", 16, 16, ["a"], np.dtype(np.uint8), None)
    with pytest.raises(OutputExistsError, match="not an lpfm output"):
        OmeTiffSink(path=target).open(spec, "k" * 64, {})
    assert target.read_bytes() == b"a user's file"


@pytest.mark.parametrize(("compression", "quality", "subsampling", "expected"), [
    ("auto", 98, "4:4:4", {"compression": "jpeg", "jpeg_quality": 98, "jpeg_subsampling": "4:4:4"}),
    ("jpeg", 95, "4:4:4", {"compression": "jpeg", "jpeg_quality": 95, "jpeg_subsampling": "4:4:4"}),
    ("jpeg", 85, "4:2:0", {"compression": "jpeg", "jpeg_quality": 85, "jpeg_subsampling": "4:2:0"}),
])
def test_compression_settings_are_recorded_in_provenance(tmp_path: Path, compression: str, quality: int,
                                                         subsampling: str, expected: dict) -> None:
    from lpfm_toolkit.sinks.base import OutputSpec

    img = np.random.default_rng(4).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    spec = OutputSpec("t", 96, 64, ["R", "G", "B"], np.dtype(np.uint8), None)
    sink = OmeTiffSink(tmp_path, compression=compression, jpeg_quality=quality, jpeg_subsampling=subsampling)
    with sink.open(spec, "k" * 64, {}) as w:
        w.write_rows(img)
        ref = w.commit(_prov())
    for key in ("compression", "jpeg_quality", "jpeg_subsampling"):
        assert ref.provenance.output.get(key) == expected.get(key)
        assert read_provenance(ref.uri).output.get(key) == expected.get(key)  # the sidecar
    with tifffile.TiffFile(ref.uri) as tif:
        page = tif.pages[0]
        assert page.compression == 7  # JPEG; 4:4:4 as RGB JPEG (Bio-Formats misreads YCbCr 4:4:4)
        assert page.photometric == (2 if subsampling == "4:4:4" else 6)
        assert page.tags["YCbCrSubSampling"].value == ((1, 1) if subsampling == "4:4:4" else (2, 2))


def test_writer_that_cannot_open_its_second_scratch_file_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """The uncertainty pyramid failing to open must not leak the image's scratch file, folder or threads."""
    from lpfm_toolkit.sinks import ometiff
    from lpfm_toolkit.sinks.base import OutputSpec

    real = ometiff._TilePyramid
    opened: list = []

    def second_fails(*args, **kwargs):  # type: ignore[no-untyped-def]
        if args[1] == "unc":
            raise OSError(28, "No space left on device")
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(ometiff, "_TilePyramid", second_fails)
    spec = OutputSpec("t", 64, 64, ["R", "G", "B"], np.dtype(np.uint8), None, uncertainty=True)
    with pytest.raises(OSError, match="No space"):
        OmeTiffSink(tmp_path).open(spec, "k" * 64, {})
    assert list(tmp_path.iterdir()) == []
    assert opened and opened[0]._store.closed
