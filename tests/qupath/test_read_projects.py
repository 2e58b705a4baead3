"""Reading every real QuPath-written project (0.3.2 → 0.7.0) and this project's own fixtures."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.errors import ProjectError
from lpfm_toolkit.integrations.qupath import QuPathProject, path_from_uri
from lpfm_toolkit.integrations.qupath.files import ProjectNotFoundError, qpproj_text

# folder → (version, entries, lastID, Windows paths?) as found in the files
REAL = {
    "0.3.2-Histopathology-Image-Tiling": ("0.3.2", 434, 459, True),
    "0.4.0-QuPath_Foci": ("0.4.0", 44, 285, False),
    "0.5.1-AndrewZhang419-QuPath": ("0.5.1", 3, 7, False),
    "0.6.0-rc3-metadata-qupath": ("0.6.0-rc3", 107, 107, True),
    "0.7.0-SpleenFollicleCounterQP": ("0.7.0", 14, 27, False),
}


def check_project(folder: Path, version: str, n_entries: int, windows: bool) -> QuPathProject:
    """Open with the file backend and compare every entry with the raw JSON."""
    proj = QuPathProject.open(folder, backend="file")
    assert proj.backend == "file" and proj.version == version
    raw = json.loads((folder / "project.qpproj").read_text(encoding="utf-8"))
    assert len(proj.entries) == len(raw["images"]) == n_entries
    for entry, img in zip(proj.entries, raw["images"]):
        assert entry.id == str(img["entryID"]) and entry.name == img["imageName"]
        builder = img["serverBuilder"]
        builder = builder if "uri" in builder else builder["builder"]  # rotated/transformed servers nest it
        assert entry.uri == builder["uri"] and not entry.is_result
        path = path_from_uri(entry.uri)
        assert isinstance(path, PureWindowsPath if windows else PurePosixPath)
        assert "%" not in str(path)  # fully decoded
        md = builder.get("metadata")
        if md is None:
            assert entry.levels == () and entry.width is None
            continue
        assert (entry.width, entry.height) == (md["width"], md["height"])
        assert [(lv.width, lv.height, lv.downsample) for lv in entry.levels] == \
            [(lv["width"], lv["height"], lv["downsample"]) for lv in md["levels"]]
        cal = md["pixelCalibration"]["pixelWidth"]
        assert entry.mpp == ((cal["value"], md["pixelCalibration"]["pixelHeight"]["value"])
                             if cal["unit"] == "µm" else None)
        assert list(entry.channels) == [c["name"] for c in md["channels"]]
        assert entry.tags == tuple(img.get("tags", ()))
    return proj


def test_every_real_project_is_read(qupath_fixtures: Path) -> None:
    found = sorted(p.parent.name for p in qupath_fixtures.glob("*/project.qpproj"))
    assert found == sorted(REAL), "fixture set changed: update REAL"
    for name, (version, n, last_id, windows) in REAL.items():
        folder = qupath_fixtures / name
        check_project(folder, version, n, windows)
        raw = (folder / "project.qpproj").read_bytes()
        assert json.loads(raw)["lastID"] == last_id
        # our serialiser writes exactly what QuPath's Gson wrote: unknown keys and order survive a write
        assert qpproj_text(json.loads(raw)).encode("utf-8") == raw


def test_real_details(qupath_fixtures: Path) -> None:
    foci = QuPathProject.open(qupath_fixtures / "0.4.0-QuPath_Foci" / "project.qpproj")
    e242 = foci.entry("242")
    assert e242.image_type == "FLUORESCENCE" and e242.annotation_counts == {"Training": 16, "Unclassified": 1047}
    assert e242.mpp is None  # calibrated in "px": unknown pixel size
    assert foci.annotation_counts(e242) == {"Training": 16, "Unclassified": 1047}  # from summary.json
    assert len({e.id for e in foci.entries}) == 44  # the 90 orphaned data/ folders are not entries
    az = QuPathProject.open(qupath_fixtures / "0.5.1-AndrewZhang419-QuPath")
    assert az.entry("1").annotation_counts == {"Unclassified": 8} and az.entry("1").image_type == "BRIGHTFIELD_H_DAB"
    assert az.entry("MTA3-1_GPC3.svs").id == "7" and az.entry("7").width is None  # no builder metadata
    assert az.backend == "file"  # no QuPath installation here (auto)
    assert path_from_uri(az.entry("1").uri) == PurePosixPath("/Users/shuningliu/Downloads/MTA3-8_GPC3 (2).svs")
    tr = QuPathProject.open(qupath_fixtures / "0.6.0-rc3-metadata-qupath")
    assert str(path_from_uri(tr.entry("2").uri)).startswith("E:\\KONTROLHE_2025\\ŞUBAT19.02.25_HE_0")
    spleen = QuPathProject.open(qupath_fixtures / "0.7.0-SpleenFollicleCounterQP")
    assert spleen.entry("14").name.endswith("resolution #1") and spleen.entry("1").channels[0] == "DAPI"
    with pytest.raises(ProjectError, match="no entry 'nope'"):
        spleen.entry("nope")


def test_bundled_mit_copies(bundled: Path) -> None:
    check_project(bundled / "mit" / "0.6.0-rc3-metadata-qupath", "0.6.0-rc3", 107, True)
    check_project(bundled / "mit" / "0.3.2-Histopathology-Image-Tiling", "0.3.2", 12, True)


def test_bundled_own_fixtures(bundled: Path) -> None:
    p04 = check_project(bundled / "own" / "0.4.0-synthetic", "0.4.0", 2, False)
    assert path_from_uri(p04.entry("3").uri) == PurePosixPath("/home/lab/Projets/Étude QuPath/images/slide A.ome.tif")
    assert p04.entry("Ωmega (2).svs").annotation_counts == {"Stroma": 4}
    assert p04.entry("3").pixel_type == "UINT16" and p04.entry("3").mpp == (0.325, 0.325)
    p05 = check_project(bundled / "own" / "0.5.1-synthetic", "0.5.1", 2, True)
    assert p05.entry("1").image_type == "BRIGHTFIELD_H_DAB"
    p07 = check_project(bundled / "own" / "0.7.0-synthetic", "0.7.0", 2, False)
    e8 = p07.entry("8")
    assert e8.tags == ("train", "spleen") and e8.description == "reference spleen" and e8.metadata["patient"] == "P-17"
    rotated = p07.entry("9")
    assert rotated.transformed and rotated.uri == "file:/srv/data/spleen/HDL002.ome.tiff"
    with pytest.raises(ProjectError, match="'rotated' transform"):
        p07.resolve(rotated)


def test_missing_and_broken_projects(tmp_path: Path) -> None:
    with pytest.raises(ProjectNotFoundError):
        QuPathProject.open(tmp_path)
    (tmp_path / "project.qpproj").write_text('{"version": "0.5.1", "images": [', encoding="utf-8")
    with pytest.raises(ProjectError, match="not valid JSON"):
        QuPathProject.open(tmp_path)
    (tmp_path / "project.qpproj").write_text('{"version": "0.5.1"}', encoding="utf-8")
    with pytest.raises(ProjectError, match="no 'images' list"):
        QuPathProject.open(tmp_path)


def test_cli_list_real_projects(qupath_fixtures: Path) -> None:
    runner = CliRunner()
    for name in ("0.4.0-QuPath_Foci", "0.5.1-AndrewZhang419-QuPath", "0.7.0-SpleenFollicleCounterQP"):
        result = runner.invoke(cli, ["qupath", "list", str(qupath_fixtures / name)], env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        assert f"QuPath {REAL[name][0]}" in result.output and "MISSING" in result.output
    result = runner.invoke(cli, ["qupath", "list", str(qupath_fixtures / "0.5.1-AndrewZhang419-QuPath")],
                           env={"COLUMNS": "250"})
    assert "Unclassified 8" in result.output and "101591×62506" in result.output


def test_cli_list_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["qupath", "list", str(tmp_path)])
    assert result.exit_code == 2 and "no QuPath project" in result.output and "Traceback" not in result.output


def test_annotation_file_convention(qp, bundled: Path, tmp_path: Path) -> None:
    folder = qp.copy_tree(bundled / "own" / "0.4.0-synthetic", tmp_path / "p")
    own = bundled / "own" / "geojson"
    (folder / "annotations").mkdir()
    (folder / "annotations" / "slide A.geojson").write_bytes((own / "qupath-0.5-featurecollection.geojson").read_bytes())
    project = QuPathProject.open(folder, "file")
    e3, e5 = project.entry("3"), project.entry("5")
    assert project.annotation_file(e3) == folder / "annotations" / "slide A.geojson"  # image name without .ome.tif
    assert project.annotation_file(e5) is None and project.annotation_counts(e5) == {"Stroma": 4}  # summary.json
    (folder / "annotations" / "3.geojson").write_bytes((own / "qupath-0.3-bare-list.json").read_bytes())
    assert project.annotation_file(e3) == folder / "annotations" / "3.geojson"  # <entryID>.geojson comes first
    assert project.annotation_counts(e3) == {"Tumor": 1, "Stroma": 1}
    assert [a.name for a in project.annotations(e3, names=["region A"])] == ["region A"]
    given = QuPathProject.open(folder, "file", annotations=own / "qupath-0.5-featurecollection.geojson")
    assert len(given.annotations(e5)) == 3  # --annotations FILE wins
    with pytest.raises(ProjectError, match="does not exist"):
        QuPathProject.open(folder, "file", annotations=tmp_path / "nope.geojson")
