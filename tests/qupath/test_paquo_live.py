"""The paquo backend against a real QuPath installation. Opt-in: ``pytest tests/qupath --qupath``.

Without ``--qupath`` every test here is SKIPPED and the skip message says so: the paquo backend was NOT
verified by such a run. With ``--qupath`` and no QuPath found, the tests fail (they never pass silently).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shapely.geometry import box

from lpfm_toolkit.engine import get_engine
from lpfm_toolkit.integrations.qupath import QuPathProject, enhance_project
from lpfm_toolkit.integrations.qupath.paquo_backend import find_qupath_installation

pytestmark = pytest.mark.qupath


@pytest.fixture(autouse=True)
def need_qupath(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("--qupath"):
        pytest.skip("paquo backend NOT tested: needs a QuPath installation; run with --qupath (PAQUO_QUPATH_DIR)")
    if find_qupath_installation() is None:
        pytest.fail("--qupath was given but paquo finds no QuPath: set PAQUO_QUPATH_DIR")


def test_paquo_lists_the_same_entries_as_the_file_backend(qp, qupath_fixtures: Path, tmp_path: Path) -> None:
    folder = qp.copy_tree(qupath_fixtures / "0.5.1-AndrewZhang419-QuPath", tmp_path / "p")
    by_file = QuPathProject.open(folder, "file").entries
    by_paquo = QuPathProject.open(folder, "paquo", readonly=True).entries
    assert [(e.id, e.name, e.uri) for e in by_paquo] == [(e.id, e.name, e.uri) for e in by_file]


def test_paquo_end_to_end(tmp_path: Path, sample_slide: Path) -> None:
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject as PaquoProject

    folder = tmp_path / "proj"
    with PaquoProject(folder, mode="x") as qp:
        entry = qp.add_image(sample_slide, image_type=QuPathImageType.BRIGHTFIELD_H_E)
        tumor, stroma = QuPathPathClass("Tumor"), QuPathPathClass("Stroma")
        qp.path_classes = [tumor, stroma]
        entry.hierarchy.add_annotation(roi=box(900, 1200, 1020, 1300), path_class=tumor).name = "t1"
        entry.hierarchy.add_annotation(roi=box(950, 1250, 1150, 1450), path_class=stroma).name = "s1"
        qp.save()
    project = QuPathProject.open(folder)  # auto: QuPath is installed
    assert project.backend == "paquo"
    src = project.entries[0]
    assert sorted(a.class_name for a in project.annotations(src)) == ["Stroma", "Tumor"]
    outcomes = enhance_project(project, "sr x2", get_engine("identity"), classes=["Tumor"], output_dir=tmp_path / "o")
    assert [o.status for o in outcomes] == ["done"]
    again = enhance_project(QuPathProject.open(folder), "sr x2", get_engine("identity"), classes=["Tumor"],
                            output_dir=tmp_path / "o")
    assert [o.status for o in again] == ["skipped"]
    reread = QuPathProject.open(folder, "paquo", readonly=True)
    assert len(reread.entries) == 2
    result = reread.entries[1]
    assert result.metadata["lpfm.source.entry"] == src.id and result.name.endswith("Tumor t1 [lpfm sr×2]")
    carried = {a.class_name: a for a in reread.annotations(result)}
    assert carried["Tumor"].geometry.equals(box(0, 0, 240, 200))
    assert carried["Stroma"].geometry.equals(box(100, 100, 240, 200))
    raw = json.loads((folder / "project.qpproj").read_text(encoding="utf-8"))
    assert len(raw["images"]) == 2 and raw["images"][1]["metadata"]["lpfm.idempotency_key"]
