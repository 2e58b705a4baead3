"""The entries `lpfm qupath enhance` adds agree with what Bio-Formats reports for their images.

QuPath opens an entry through ``BioFormatsImageServer`` and compares the server with the metadata stored in the
entry (levels, channels, pixel size): an entry promising levels the reader does not have fails when a user zooms
out ("Invalid resolution"), and one whose channel or timepoint count differs does not open. Two projects: one
written here around the bundled RGB slide, in a folder and with names full of non-ASCII characters, and a copy of
the real QuPath 0.4.0 project in ../shared/fixtures/qupath, whose images are all single-channel 16-bit (its
images are stand-ins written here, found through ``--remap``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.integrations.qupath.uris import as_local, path_from_uri
from lpfm_toolkit.provenance import NAMESPACE

#: ../shared/fixtures/qupath beside the checkout (real QuPath-written projects)
SHARED_FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "qupath"
FOCI = "0.4.0-QuPath_Foci"
FOCI_IMAGES = "/home/phm/Images/TrainingFoci/RNA/Images"
FOCI_ENTRY = "381_P14_C1ql1-570_Cbln1-633_GFP-520_n2_1_w4CSU-6420000.tif"
QUPATH_PIXEL_TYPES = {
    "uint8": "UINT8",
    "int8": "INT8",
    "uint16": "UINT16",
    "int16": "INT16",
    "uint32": "UINT32",
    "int32": "INT32",
    "float": "FLOAT32",
    "double": "FLOAT64",
}


def _enhance(*args: str) -> Any:
    return CliRunner().invoke(cli, ["qupath", "enhance", *args], env={"COLUMNS": "250"}, catch_exceptions=False)


def _added(project: Path) -> list[dict]:
    images = json.loads((project / "project.qpproj").read_text(encoding="utf-8"))["images"]
    return [e for e in images if "lpfm.idempotency_key" in (e.get("metadata") or {})]


@pytest.fixture(scope="module")
def projects(
    qp, tmp_path_factory: pytest.TempPathFactory, sample_slide: Path, interop_strict: bool
) -> dict[str, Path]:
    fixture = SHARED_FIXTURES / FOCI
    if not fixture.is_dir():
        msg = f"{fixture} not present: the real QuPath 0.4.0 project was NOT read"
        if interop_strict:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("qupath")
    # RGB, non-ASCII everywhere: slide folder and name, project folder, class and annotation names, prompt
    slides = root / "lames ü 日本"
    slides.mkdir()
    slide = slides / "cas µ×1 → 細胞.svs"
    os.symlink(sample_slide, slide)
    # a 0.5.1-shaped project with one entry (the bundled slide, under a non-ASCII name) and a non-ASCII annotation
    box = qp.box_feature(900, 1200, 300, 260, "Tümor µ", "région ×1 → 細胞", "00000000-0000-4000-8000-000000000001")
    rgb = qp.write_project(root / "projet µ×→ü 細胞", slide, annotations=[box])
    result = _enhance(str(rgb), "--class", "Tümor µ", "--engine", "identity", "-p", "sr x2", "--tiff-tile", "256")
    assert result.exit_code == 0 and "1 done" in result.output, result.output
    # the real QuPath 0.4.0 project: single-channel 16-bit images, no pixel size
    foci = root / "foci"
    shutil.copytree(fixture, foci, copy_function=shutil.copyfile)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(9)
    tifffile.imwrite(images / FOCI_ENTRY, (rng.random((2048, 2048)) * 4000 + 200).astype(np.uint16))
    boxes = root / "foci-boxes.geojson"
    boxes.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [qp.box_feature(300, 400, 600, 520, "Nucleus", "n1", "00000000-0000-4000-8000-0000000000f1")],
            }
        ),
        encoding="utf-8",
    )
    result = _enhance(
        str(foci),
        "--image",
        FOCI_ENTRY,
        "--annotations",
        str(boxes),
        "--class",
        "Nucleus",
        "--engine",
        "classical",
        "-p",
        "denoise",
        "--tiff-tile",
        "256",
        "--remap",
        f"{FOCI_IMAGES}={images}",
    )
    assert result.exit_code == 0 and "1 done" in result.output, result.output
    return {"rgb": rgb, "foci": foci}


def test_single_channel_fixture_project_enhances(projects: dict[str, Path]) -> None:
    """Regression (issue 9): single-channel entries of the real 0.4.0 project crashed in blending."""
    (entry,) = _added(projects["foci"])
    meta = entry["serverBuilder"]["metadata"]
    assert meta["pixelType"] == "UINT16" and len(meta["channels"]) == 1 and meta["isRGB"] is False
    assert (meta["width"], meta["height"]) == (600, 520)


@pytest.fixture(scope="module")
def entries(projects: dict[str, Path], bioformats: Any, tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """(project, entry JSON, Bio-Formats' view of its image) for every entry lpfm added, probed in one JVM."""
    found = [(name, e) for name, p in projects.items() for e in _added(p)]
    paths = [as_local(path_from_uri(e["serverBuilder"]["uri"])) for _, e in found]
    assert all(p is not None and p.is_file() for p in paths), paths
    views = bioformats.probe([Path(p) for p in paths if p is not None], tmp_path_factory.mktemp("probe-qupath"))
    return [(name, e, v) for (name, e), v in zip(found, views)]


@pytest.mark.bioformats
@pytest.mark.parametrize("project", ["rgb", "foci"])
def test_entry_metadata_agrees_with_bioformats(entries: list[tuple], project: str) -> None:
    ((entry, view),) = [(e, v) for name, e, v in entries if name == project]
    assert "error" not in view.info, view.info.get("error")
    assert view["reader"] == "loci.formats.in.OMETiffReader"
    meta = entry["serverBuilder"]["metadata"]
    assert entry["serverBuilder"]["providerClassName"].endswith("BioFormatsServerBuilder")
    assert (meta["width"], meta["height"]) == (view["size_x"], view["size_y"])
    assert (meta["sizeZ"], meta["sizeT"]) == (view["size_z"], view["size_t"]) == (1, 1)
    # levels: as many as the reader has, same sizes, QuPath's downsample (mean of both ratios)
    assert [[lv["width"], lv["height"]] for lv in meta["levels"]] == view["levels"]
    assert len(meta["levels"]) == view["resolution_count"] > 1
    for lv, (w, h) in zip(meta["levels"], view["levels"]):
        assert lv["downsample"] == pytest.approx((view["size_x"] / w + view["size_y"] / h) / 2, rel=0.01)
    # channels, pixel type, RGB
    assert meta["isRGB"] is view["is_rgb"]
    assert len(meta["channels"]) == view["size_c"]
    names = [c["name"] for c in meta["channels"]]
    assert names == (["Red", "Green", "Blue"] if view["is_rgb"] else view["channel_names"])
    assert meta["pixelType"] == QUPATH_PIXEL_TYPES[view["pixel_type"]]
    # pixel size: µm when Bio-Formats has one, QuPath's "px" calibration when it has none
    cal = meta["pixelCalibration"]
    if view["pixel_width_um"] is None:
        assert cal["pixelWidth"]["unit"] == cal["pixelHeight"]["unit"] == "px"
    else:
        assert cal["pixelWidth"]["unit"] == "µm"
        assert cal["pixelWidth"]["value"] == pytest.approx(view["pixel_width_um"], rel=1e-9)
        assert cal["pixelHeight"]["value"] == pytest.approx(view["pixel_height_um"], rel=1e-9)
    # the provenance the entry shows is the one inside the image
    inside = view.map_annotations[NAMESPACE]
    for key in ("lpfm.idempotency_key", "lpfm.prompt", "lpfm.task", "lpfm.task.scale", "lpfm.engine"):
        assert entry["metadata"][key] == inside[key]


@pytest.mark.bioformats
def test_rgb_entry_is_the_super_resolved_region(entries: list[tuple], sample_slide: Path) -> None:
    ((entry, view),) = [(e, v) for name, e, v in entries if name == "rgb"]
    assert view["pixel_width_um"] == pytest.approx(0.499 / 2)
    assert "細胞" in view["file"] and "ü" in view["file"]
    from lpfm_toolkit.sources import open_image

    with open_image(sample_slide) as h:
        src = h.read_region(0, 900, 1200, 300, 260).repeat(2, 0).repeat(2, 1)
    # written with --compression auto: JPEG q98 4:4:4, decoded by Bio-Formats exactly as by tifffile
    assert entry["metadata"].get("lpfm.idempotency_key")
    np.testing.assert_array_equal(view.pixels(0), tifffile.imread(view["file"]))
    err = view.pixels(0).astype(np.float64) - src
    assert 10 * np.log10(255.0**2 / np.mean(err**2)) > 45
