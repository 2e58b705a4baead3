"""End to end on the bundled sample slide: a QuPath project around it, `lpfm qupath enhance --class X`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from shapely.geometry import box

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.integrations.qupath import QuPathProject, read_geojson
from lpfm_toolkit.sources import open_image

T1 = (900, 1200, 120, 100)  # x, y, w, h of the Tumor boxes (level-0 pixels)
T2 = (1500, 600, 80, 90)
S1 = (950, 1250, 200, 200)  # Stroma, overlapping T1's lower right corner


def run(*args: str) -> object:
    return CliRunner().invoke(cli, ["qupath", *args], env={"COLUMNS": "250"}, catch_exceptions=False)


@pytest.fixture
def project(qp, tmp_path: Path, sample_slide: Path) -> Path:
    feats = [qp.box_feature(*T1, "Tumor", "t1", "00000000-0000-4000-8000-000000000001"),
             qp.box_feature(*T2, "Tumor", "t2", "00000000-0000-4000-8000-000000000002"),
             qp.box_feature(*S1, "Stroma", "s1", "00000000-0000-4000-8000-000000000003"),
             {"type": "Feature", "id": "00000000-0000-4000-8000-000000000004",
              "geometry": {"type": "Point", "coordinates": [100, 100]},
              "properties": {"objectType": "annotation", "name": "dot", "classification": {"name": "Tumor"}}}]
    return qp.write_project(tmp_path / "proj", sample_slide, "0.5.1", annotations=feats)


def test_enhance_class_adds_one_entry_per_annotation_with_rescaled_geometry(project: Path) -> None:
    result = run("enhance", str(project), "--class", "Tumor", "--engine", "classical", "--prompt", "sr x2")
    assert result.exit_code == 0, result.output
    assert "2 done" in result.output and "nothing to do" in result.output  # the point has no area
    proj = QuPathProject.open(project, "file")
    added = proj.entries[1:]
    assert [e.name for e in added] == ["cmu_small_region.svs Tumor t1 [lpfm sr×2]",
                                       "cmu_small_region.svs Tumor t2 [lpfm sr×2]"]
    for entry, (x, y, w, h), ident in zip(added, (T1, T2), ("1", "2")):
        assert entry.metadata["lpfm.source.entry"] == "1" and entry.metadata["lpfm.source.region"] == f"{x},{y},{w},{h}"
        assert entry.metadata["lpfm.task.scale"] == "2" and entry.metadata["lpfm.engine"] == "classical"
        assert (entry.width, entry.height) == (2 * w, 2 * h) and entry.mpp == pytest.approx((0.2495, 0.2495))
        image = proj.resolve(entry)
        with open_image(image) as out:
            assert (out.levels[0].width, out.levels[0].height) == (2 * w, 2 * h)
        sidecar = json.loads((project / entry.metadata["lpfm.sidecar"]).read_text(encoding="utf-8"))
        assert sidecar["idempotency_key"] == entry.metadata["lpfm.idempotency_key"]
        carried = read_geojson(project / entry.metadata["lpfm.annotations"])
        own = [a for a in carried if a.properties.get("metadata", {}).get("lpfm.source.annotation")
               == f"00000000-0000-4000-8000-00000000000{ident}"]
        assert len(own) == 1 and own[0].class_name == "Tumor"
        assert own[0].geometry.equals(box(0, 0, 2 * w, 2 * h))  # shifted to the region origin, scaled ×2
        assert proj.annotation_counts(entry)["Tumor"] == 1
    stroma = [a for a in read_geojson(project / added[0].metadata["lpfm.annotations"]) if a.class_name == "Stroma"]
    sx, sy = S1[0] - T1[0], S1[1] - T1[1]
    assert len(stroma) == 1 and stroma[0].geometry.equals(box(2 * sx, 2 * sy, 2 * T1[2], 2 * T1[3]))  # clipped
    assert [e.id for e in proj.entries] == ["1", "2", "3"]
    before = (project / "project.qpproj").read_bytes()
    again = run("enhance", str(project), "--class", "Tumor", "--engine", "classical", "--prompt", "sr x2")
    assert again.exit_code == 0 and "2 skipped" in again.output
    assert (project / "project.qpproj").read_bytes() == before  # a re-run adds nothing
    listing = run("list", str(project))
    assert listing.exit_code == 0 and "from 1" in listing.output and "Stroma 1, Tumor 3" in listing.output


def test_interrupted_run_gets_its_entry_without_recomputing(project: Path) -> None:
    assert run("enhance", str(project), "--annotation", "t2", "--engine", "classical", "-p", "sr x2").exit_code == 0
    data = json.loads((project / "project.qpproj").read_text(encoding="utf-8"))
    output = QuPathProject.open(project, "file").resolve(QuPathProject.open(project, "file").entries[-1])
    mtime = output.stat().st_mtime_ns
    data["images"] = data["images"][:1]  # as if the run stopped after the file, before the entry
    (project / "project.qpproj").write_text(json.dumps(data, indent=2), encoding="utf-8")
    again = run("enhance", str(project), "--annotation", "t2", "--engine", "classical", "-p", "sr x2")
    assert again.exit_code == 0 and "1 skipped" in again.output
    entries = QuPathProject.open(project, "file").entries
    assert len(entries) == 2 and entries[-1].name.endswith("t2 [lpfm sr×2]") and output.stat().st_mtime_ns == mtime


def test_moved_project_and_remap(qp, tmp_path: Path, sample_slide: Path) -> None:
    # moved together: the project remembers D:/lab/proj, the slide was at D:/lab/slides
    slides = tmp_path / "lab" / "slides"
    slides.mkdir(parents=True)
    os.symlink(sample_slide, slides / "cmu_small_region.svs")
    feats = [qp.box_feature(100, 100, 64, 64, "Tumor", "a", "00000000-0000-4000-8000-00000000000a")]
    moved = qp.write_project(tmp_path / "lab" / "proj", sample_slide, "0.7.0", annotations=feats,
                             old_uri="file:/D:/lab/proj/project.qpproj",
                             image_uri="file:/D:/lab/slides/cmu_small_region.svs")
    listing = run("list", str(moved))
    assert "found (relative)" in listing.output
    result = run("enhance", str(moved), "--class", "Tumor", "--engine", "identity", "-p", "sr x4")
    assert result.exit_code == 0 and "1 done" in result.output, result.output
    added = json.loads((moved / "project.qpproj").read_text(encoding="utf-8"))["images"][-1]
    assert added["tags"] == [] and added["entryID"] == 2  # 0.7 shape
    # elsewhere: only --remap finds it
    other = qp.write_project(tmp_path / "other", sample_slide, "0.4.0", annotations=feats,
                             image_uri="file:/D:/Slides/Ş%20x/cmu_small_region.svs".replace("Ş", "%C5%9E"))
    missing = run("enhance", str(other), "--class", "Tumor", "--engine", "identity", "-p", "sr x2")
    assert missing.exit_code == 1 and "failed" in missing.output and "--remap" in missing.output
    ok = run("enhance", str(other), "--class", "Tumor", "--engine", "identity", "-p", "sr x2",
             "--remap", f"D:\\Slides\\Ş x={slides}")
    assert ok.exit_code == 0 and "1 done" in ok.output, ok.output
    server = json.loads((other / "data" / "2" / "server.json").read_text(encoding="utf-8"))
    assert "builder" not in server and "builderType" not in server  # 0.4 shape


def test_annotations_option_and_selection_errors(qp, project: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra.geojson"
    extra.write_text(json.dumps([qp.box_feature(10, 20, 40, 30, "Necrosis", "n1", None)]), encoding="utf-8")
    result = run("enhance", str(project), "--annotations", str(extra), "--class", "Necrosis", "--image",
                 "cmu_small_region.svs", "--engine", "identity", "-p", "denoise")
    assert result.exit_code == 0 and "1 done" in result.output, result.output
    added = QuPathProject.open(project, "file").entries[-1]
    assert added.name.startswith("cmu_small_region.svs Necrosis n1") and (added.width, added.height) == (40, 30)
    wrong_class = run("enhance", str(project), "--class", "Nope", "--engine", "identity", "-p", "sr x2")
    assert wrong_class.exit_code == 2 and "classes found: Stroma, Tumor" in wrong_class.output
    wrong_image = run("enhance", str(project), "--image", "nope.svs", "--engine", "identity", "-p", "sr x2")
    assert wrong_image.exit_code == 2 and "no entry 'nope.svs'" in wrong_image.output
    bad_prompt = run("enhance", str(project), "--engine", "identity", "-p", "make it pretty")
    assert bad_prompt.exit_code == 2 and "Traceback" not in bad_prompt.output
    bad_remap = run("list", str(project), "--remap", "no-equals-sign")
    assert bad_remap.exit_code == 2 and "OLD=NEW" in bad_remap.output


def test_groovy_scripts_follow_the_conventions() -> None:
    from importlib import resources

    scripts = resources.files("lpfm_toolkit.integrations.qupath") / "scripts"
    names = sorted(p.name for p in scripts.iterdir() if p.name.endswith(".groovy"))
    assert names == ["enhance_selected_annotation.groovy", "export_annotations.groovy",
                     "import_lpfm_annotations.groovy"]
    export = (scripts / "export_annotations.groovy").read_text(encoding="utf-8")
    assert "'annotations'" in export and "getID()" in export  # <project>/annotations/<entryID>.geojson
    importer = (scripts / "import_lpfm_annotations.groovy").read_text(encoding="utf-8")
    assert "lpfm.annotations" in importer
    enhance = (scripts / "enhance_selected_annotation.groovy").read_text(encoding="utf-8")
    assert "qupath" in enhance and "--annotation" in enhance and "--image" in enhance


def test_engine_options_are_checked_on_the_first_image_before_any_work(project: Path) -> None:
    before = (project / "project.qpproj").read_bytes()
    res = run("enhance", str(project), "--class", "Tumor", "--engine", "classical", "--sampler", "dpm", "-p", "sr x2")
    assert res.exit_code == 2 and "--sampler is a setting of the lpfm engine" in res.output
    res = run("enhance", str(project), "--class", "Tumor", "--engine", "classical", "--method", "wiener", "-p", "sr x2")
    assert res.exit_code == 2 and "wiener" in res.output  # a deblurring method for super-resolution
    assert (project / "project.qpproj").read_bytes() == before



def test_reproduce_a_qupath_entry_output(qp, tmp_path: Path, sample_slide: Path) -> None:
    """`lpfm reproduce` re-runs an output added to a QuPath project from its entry's image file."""
    import shutil

    slide = tmp_path / "slides" / "copy.svs"  # a copy: the test moves it away below
    slide.parent.mkdir()
    shutil.copyfile(sample_slide, slide)
    project = qp.write_project(tmp_path / "proj", slide, "0.5.1", annotations=[qp.box_feature(*T1, "Tumor", "t1",
                               "00000000-0000-4000-8000-000000000001")])
    result = run("enhance", str(project), "--class", "Tumor", "--engine", "classical", "--prompt", "denoise")
    assert result.exit_code == 0, result.output
    proj = QuPathProject.open(project, "file")
    image = proj.resolve(proj.entries[1])
    again = CliRunner().invoke(cli, ["reproduce", str(image)], env={"COLUMNS": "250"})
    assert again.exit_code == 0, again.output
    assert "identical" in again.output.lower(), again.output
    slide.rename(slide.with_name("moved.svs"))  # the slide moved: one clear line, exit 2
    gone = CliRunner().invoke(cli, ["reproduce", str(image)], env={"COLUMNS": "250"})
    assert gone.exit_code == 2 and "is gone" in gone.output and "Traceback" not in gone.output, gone.output
