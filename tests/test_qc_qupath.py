"""``lpfm qc`` on QuPath projects: real QuPath-written projects, annotations with measurements in their format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lpfm_toolkit.engine.estimate_synthetic import sample_tissue, synthetic_slide, tissue_mosaic

pytestmark = pytest.mark.qc

DATA = Path(__file__).resolve().parent / "data" / "qupath"
REAL_061 = DATA / "mit" / "0.6.0-rc3-metadata-qupath"  # written by QuPath 0.6.0-rc3, 107 entries (MIT)
FIRST_IMAGE = "kontrol15.01.25_14_6_134952.svs"
OLD_FOLDER = "E:/KONTROLHE_2025/OCAK15.01.25_HE_0"


@pytest.fixture(scope="module")
def degraded_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1024² tiled TIFF of held-out real tissue with pasted defects, named like the project's first image."""
    folder = tmp_path_factory.mktemp("slides")
    s = synthetic_slide(
        tissue_mosaic(sample_tissue("holdout"), 1024, 1024, seed=11),
        seed=11,
        block=1,
        p_blur=0.4,
        p_noise=0.4,
        p_jpeg=0.3,
    )
    return s.write(folder / FIRST_IMAGE)


def _project(tmp_path: Path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(REAL_061, dst, copy_function=shutil.copyfile)
    return dst


def test_qc_adds_an_entry_with_annotations_and_measurements(degraded_slide: Path, tmp_path: Path) -> None:
    from lpfm_toolkit.engine.estimate import ClassicalEstimator
    from lpfm_toolkit.integrations.qupath import QuPathProject, read_geojson
    from lpfm_toolkit.integrations.qupath.qc import qc_project
    from lpfm_toolkit.integrations.qupath.uris import Remap

    folder = _project(tmp_path)
    before = json.loads((folder / "project.qpproj").read_text(encoding="utf-8"))
    remap = Remap(OLD_FOLDER, str(degraded_slide.parent))
    with QuPathProject.open(folder, backend="file", remaps=[remap]) as project:
        outcomes = qc_project(project, images=["1"], estimator=ClassicalEstimator())
        (o,) = outcomes
        assert o.status == "done", o.error
        summary = o.qc.summary()
        assert summary["flagged_fraction"] > 0
        again = qc_project(project, images=["1"], estimator=ClassicalEstimator())
        assert again[0].status == "skipped"  # the same QC is found by its key
    after = json.loads((folder / "project.qpproj").read_text(encoding="utf-8"))
    assert after["images"][: len(before["images"])] == before["images"]  # no existing entry touched
    assert len(after["images"]) == len(before["images"]) + 1
    new = after["images"][-1]
    # the new entry has the shape QuPath 0.6 writes, and shows the same image file
    assert set(new) == set(before["images"][0]) - {"description", "tags"} | {"metadata"}
    assert new["serverBuilder"]["uri"].endswith(FIRST_IMAGE) and new["imageName"].endswith("[lpfm qc]")
    assert new["serverBuilder"]["providerClassName"] == before["images"][0]["serverBuilder"]["providerClassName"]
    meta = new["metadata"]
    assert meta["lpfm.task"] == "qc" and meta["lpfm.source.entry"] == "1"
    assert float(meta["lpfm.qc.flagged_fraction"]) == pytest.approx(summary["flagged_fraction"], abs=1e-4)
    geo = folder / meta["lpfm.annotations"]
    doc = json.loads(geo.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection" and doc["features"]
    for f in doc["features"]:  # QuPath 0.4+ GeoJSON, as in the real exports in ../shared and tests/data
        assert f["type"] == "Feature" and len(f["id"]) == 36
        assert f["geometry"]["type"] == "Polygon"
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in ("lpfm: out of focus", "lpfm: noisy", "lpfm: compressed")
        assert len(props["classification"]["color"]) == 3
        assert isinstance(props["measurements"], dict) and "lpfm noise sigma" in props["measurements"]
        assert all(isinstance(v, (int, float)) for v in props["measurements"].values())
    anns = read_geojson(geo)  # our reader (used on real QuPath exports) reads it back
    assert {a.class_name for a in anns} == {f["properties"]["classification"]["name"] for f in doc["features"]}
    assert all(a.properties["measurements"] for a in anns)
    report = json.loads((folder / meta["lpfm.qc.report"]).read_text())
    assert report["summary"]["flagged_fraction"] == summary["flagged_fraction"]


def test_real_geojson_fixture_keys_match(shared_dir: Path, degraded_slide: Path, tmp_path: Path) -> None:
    """Our features use the same property keys and value types as QuPath's own exports in ../shared."""
    from lpfm_toolkit.engine.estimate import ClassicalEstimator
    from lpfm_toolkit.integrations.qupath.geojson import to_feature
    from lpfm_toolkit.qc import assess, qc_features
    from lpfm_toolkit.sources import open_image

    real = json.loads(
        (shared_dir / "fixtures" / "qupath" / "geojson" / "coscia-example2-multipolygon.geojson").read_text(
            encoding="utf-8"
        )
    )
    real_f = next(f for f in real["features"] if "classification" in f["properties"])
    with open_image(degraded_slide) as h:
        ours = [to_feature(a) for a in qc_features(assess(h, estimator=ClassicalEstimator()))]
    assert ours
    for f in ours:
        assert set(real_f) <= set(f)  # type, id, geometry, properties
        assert set(real_f["properties"]) <= set(f["properties"])  # objectType, name, classification
        assert type(f["properties"]["classification"]["color"][0]) is type(
            real_f["properties"]["classification"]["color"][0]
        )


def test_cli_qc_on_a_project_ranks_entries(degraded_slide: Path, sample_slide: Path, tmp_path: Path) -> None:
    from lpfm_toolkit.cli.main import cli

    folder = _project(tmp_path)
    second = tmp_path / "second"  # entry 2 shows the clean sample slide under its name
    second.mkdir()
    shutil.copyfile(sample_slide, second / "kontrol19.02.2025_11_1_SS45328_041327.svs")
    out = tmp_path / "qc"
    args = [
        "qc",
        str(folder),
        "--images",
        "1",
        "--images",
        "2",
        "--images",
        "3",
        "--estimator",
        "classical",
        "--files-only",
        "--out",
        str(out),
        "--remap",
        f"{OLD_FOLDER}={degraded_slide.parent}",
        "--remap",
        f"E:/KONTROLHE_2025/ŞUBAT19.02.25_HE_0={second}",
        "--json",
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "3: kontrol20.01.25_13_26_054849.svs: failed" in res.output  # its image is nowhere: one line, no stop
    ranked = json.loads(res.output[res.output.index("[") :])
    assert [r["id"] for r in ranked] == ["1", "2"]  # the degraded slide first
    assert ranked[0]["flagged_fraction"] > ranked[1]["flagged_fraction"]
    assert (out / "qc-ranking.csv").read_text().splitlines()[1].startswith("1,")
    project_text = (folder / "project.qpproj").read_text(encoding="utf-8")
    assert "[lpfm qc]" not in project_text  # --files-only adds no entries
