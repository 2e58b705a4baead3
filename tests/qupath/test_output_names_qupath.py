"""Output file names of QuPath runs: no ``.svs`` inside, the annotation as the region part, ``--name`` for
``lpfm qupath enhance`` and for QuPath jobs (whose results are found by the coordinator wherever they were named)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.integrations.qupath import QuPathProject
from lpfm_toolkit.sources import open_image

T1 = (900, 1200, 120, 100)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def key_of(tiff: Path) -> str:
    side = tiff.with_name(tiff.name[: -len(".ome.tiff")] + ".lpfm.json")
    return json.loads(side.read_text(encoding="utf-8"))["idempotency_key"]


@pytest.fixture
def project(qp, tmp_path: Path, sample_slide: Path) -> Path:
    feats = [qp.box_feature(*T1, "Tumor", "t 1", "00000000-0000-4000-8000-000000000001")]
    return qp.write_project(tmp_path / "proj", sample_slide, "0.5.1", annotations=feats)


def test_qupath_outputs_are_named_without_the_slide_extension(project: Path) -> None:
    res = run("qupath", "enhance", str(project), "--class", "Tumor", "--engine", "classical", "-p", "sr x2")
    assert res.exit_code == 0, res.output
    (tiff,) = (project / "lpfm-outputs").glob("*.ome.tiff")
    assert tiff.name == f"cmu_small_region_srx2_classical_Tumor-t-1.{key_of(tiff)[:10]}.ome.tiff"
    entry = QuPathProject.open(project, "file").entries[-1]
    assert entry.name == "cmu_small_region.svs Tumor t 1 [lpfm sr×2]"  # the entry keeps its display name
    again = run("qupath", "enhance", str(project), "--class", "Tumor", "--engine", "classical", "-p", "sr x2")
    assert again.exit_code == 0 and "1 skipped" in again.output


def test_qupath_enhance_name_template_and_bad_template(project: Path) -> None:
    args = ("qupath", "enhance", str(project), "--class", "Tumor", "--engine", "classical", "-p", "sr x2")
    bad = run(*args, "--name", "{stem}/{key}")
    assert bad.exit_code == 2 and "path separator" in bad.output
    assert len(QuPathProject.open(project, "file").entries) == 1  # nothing added
    res = run(*args, "--name", "{region}_{stem}_{key}")
    assert res.exit_code == 0, res.output
    (tiff,) = (project / "lpfm-outputs").glob("*.ome.tiff")
    assert tiff.name == f"Tumor-t-1_cmu_small_region_{key_of(tiff)[:10]}.ome.tiff"
    assert "1 skipped" in run(*args, "--name", "{region}_{stem}_{key}").output


def test_qupath_job_with_a_name_template_gets_its_entry(qp, sample_slide: Path, tmp_path: Path) -> None:
    image = tmp_path / "slide.svs.tif"  # an extension inside the name, as QuPath images often have
    with open_image(sample_slide) as handle:
        tifffile.imwrite(image, handle.read_region(0, *T1), photometric="rgb")
    folder = qp.write_project(tmp_path / "project", image, entry_metadata={"lpfm.enhance": "sr x2"}, bioformats=True)
    store = str(tmp_path / "jobs.sqlite")
    add = run(
        "jobs", "add-qupath", str(folder), "--engine", "identity", "--name", "{stem}-{task}.{key}", "--store", store
    )
    assert add.exit_code == 0 and "added 1 job(s)" in add.output, add.output
    done = run("jobs", "run", "--store", store)
    assert done.exit_code == 0, done.output
    (tiff,) = (folder / "lpfm-outputs").glob("*.ome.tiff")
    assert tiff.name == f"slide-srx2.{key_of(tiff)[:10]}.ome.tiff"
    results = [e for e in QuPathProject.open(folder, "file").entries if e.is_result]
    assert len(results) == 1 and results[0].metadata["lpfm.idempotency_key"] == key_of(tiff)
