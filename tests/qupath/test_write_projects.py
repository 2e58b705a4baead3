"""Writing results back: on copies of projects of every QuPath version, originals untouched, shapes like QuPath's."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePath

import numpy as np
import pytest
import tifffile

from lpfm_toolkit.engine import get_engine
from lpfm_toolkit.errors import ProjectError
from lpfm_toolkit.integrations.qupath import QuPathProject, enhance_project, parse_remaps, path_from_uri
from lpfm_toolkit.integrations.qupath.entries import KEY_IDEMPOTENCY, KEY_SOURCE_ENTRY
from lpfm_toolkit.integrations.qupath.files import LOCK_SUFFIX, project_lock

REAL_PROJECTS = ["0.3.2-Histopathology-Image-Tiling", "0.4.0-QuPath_Foci", "0.5.1-AndrewZhang419-QuPath",
                 "0.6.0-rc3-metadata-qupath", "0.7.0-SpleenFollicleCounterQP"]
OWN_PROJECTS = ["mit/0.3.2-Histopathology-Image-Tiling", "mit/0.6.0-rc3-metadata-qupath", "own/0.4.0-synthetic",
                "own/0.5.1-synthetic", "own/0.7.0-synthetic"]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300×200 RGB TIFF that stands in for every fixture's (absent) slide."""
    path = tmp_path_factory.mktemp("img") / "tiny.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (200, 300, 3), dtype=np.uint8), photometric="rgb")
    return path


def stand_in(project: QuPathProject, entry_id: str, tiny: Path, root: Path) -> list[str]:
    """Link ``tiny`` where the entry's image would be under ``root``; return the ``--remap`` rule for it."""
    stored: PurePath = path_from_uri(project.entry(entry_id).uri)
    target = root / stored.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(tiny, target)
    return [f"{stored.parent}={root}"]


def add_result_to_copy(qp, src: Path, tmp_path: Path, tiny: Path) -> tuple[Path, dict, QuPathProject, list]:
    """Copy a project, enhance its first entry's one annotation, return the copy, its old JSON and outcomes."""
    proj_dir = qp.copy_tree(src, tmp_path / "project")
    old = json.loads((proj_dir / "project.qpproj").read_text(encoding="utf-8"))
    first = next(img for img in old["images"] if (img["serverBuilder"].get("builderType") == "uri"))
    entry_id = str(first["entryID"])
    remaps = stand_in(QuPathProject.open(proj_dir, "file"), entry_id, tiny, tmp_path / "slides")
    ann = tmp_path / "one.geojson"
    ann.write_text(json.dumps([qp.box_feature(20, 30, 64, 48, "Tumor", "roi", "aaaaaaaa-0000-4000-8000-000000000001"),
                               qp.box_feature(60, 50, 100, 100, "Stroma", "other", "aaaaaaaa-0000-4000-8000-000000000002")]),
                   encoding="utf-8")
    project = QuPathProject.open(proj_dir, "file", remaps=parse_remaps(remaps), annotations=ann)
    outcomes = enhance_project(project, "sr x2", get_engine("identity"), images=[entry_id], classes=["Tumor"],
                               output_dir=tmp_path / "out")
    return proj_dir, old, project, outcomes


def check_written(proj_dir: Path, old: dict, real_images: list[dict], real_server: dict | None) -> dict:
    """Every original entry and key unchanged; the new entry shaped like that version's real ones."""
    new = json.loads((proj_dir / "project.qpproj").read_text(encoding="utf-8"))
    assert {k: v for k, v in new.items() if k not in ("images", "lastID")} == \
        {k: v for k, v in old.items() if k not in ("images", "lastID")}
    assert new["images"][: len(old["images"])] == old["images"]
    assert len(new["images"]) == len(old["images"]) + 1
    added = new["images"][-1]
    ids = [int(i["entryID"]) for i in old["images"]]
    assert added["entryID"] == new["lastID"] > max([old["lastID"], *ids])
    assert (proj_dir / "data" / str(added["entryID"]) / "server.json").is_file()
    # same keys, same order as real entries of this version (description is optional in QuPath)
    real_keys = [k for k in real_images[0] if k != "description"]
    assert list(added) == real_keys
    real_builder = next(i["serverBuilder"] for i in real_images if "metadata" in i["serverBuilder"])
    assert list(added["serverBuilder"]) == list(real_builder)
    assert set(added["serverBuilder"]["metadata"]) <= set(real_builder["metadata"])
    assert set(real_builder["metadata"]) - set(added["serverBuilder"]["metadata"]) <= {"magnification"}
    assert isinstance(added["randomizedName"], str) and len(added["randomizedName"]) == 36
    assert (proj_dir / "project.qpproj.backup").read_text(encoding="utf-8") == json.dumps(old, indent=2,
                                                                                          ensure_ascii=False)
    server = json.loads((proj_dir / "data" / str(added["entryID"]) / "server.json").read_text(encoding="utf-8"))
    version = tuple(int(v) for v in new["version"].split("-")[0].split("."))
    if real_server is not None:  # a real server.json of this version exists: same shape
        assert list(server) == list(real_server)
        inner, real_inner = server.get("builder", server), real_server.get("builder", real_server)
        assert list(inner) == list(real_inner)
    assert ("builder" in server) == (version >= (0, 5, 0))
    assert ("builderType" in server.get("builder", server)) == (version >= (0, 5, 0))
    leftovers = [p.name for p in proj_dir.rglob("*") if p.name.endswith((".tmp", LOCK_SUFFIX))]
    assert leftovers == []
    return added


def real_server_json(folder: Path, images: list[dict]) -> dict | None:
    for img in images:
        p = folder / "data" / str(img["entryID"]) / "server.json"
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
    return None


@pytest.mark.parametrize("name", REAL_PROJECTS)
def test_round_trip_on_real_projects(qp, name: str, qupath_fixtures: Path, tmp_path: Path, tiny_tiff: Path) -> None:
    src = qupath_fixtures / name
    before = tree_digest(src)
    proj_dir, old, project, outcomes = add_result_to_copy(qp, src, tmp_path, tiny_tiff)
    assert [o.status for o in outcomes] == ["done"], outcomes
    added = check_written(proj_dir, old, old["images"], real_server_json(src, old["images"]))
    assert added["imageName"].endswith("Tumor roi [lpfm sr×2]")
    meta = added["metadata"]
    assert meta[KEY_SOURCE_ENTRY] == outcomes[0].detail["entry_id"] and meta["lpfm.task.scale"] == "2"
    assert meta[KEY_IDEMPOTENCY] and meta["lpfm.source.system"] == "qupath"
    reread = QuPathProject.open(proj_dir, "file")
    assert reread.entries[-1].is_result and reread.entries[-1].width == 128 and reread.entries[-1].height == 96
    assert [e.id for e in reread.entries[:-1]] == [str(i["entryID"]) for i in old["images"]]
    # a re-run adds nothing
    again = enhance_project(project, "sr x2", get_engine("identity"), images=[outcomes[0].detail["entry_id"]],
                            classes=["Tumor"], output_dir=tmp_path / "out")
    assert [o.status for o in again] == ["skipped"]
    assert len(json.loads((proj_dir / "project.qpproj").read_text(encoding="utf-8"))["images"]) == len(old["images"]) + 1
    assert tree_digest(src) == before  # the shared originals are byte-identical


@pytest.mark.parametrize("name", OWN_PROJECTS)
def test_round_trip_on_bundled_projects(qp, name: str, bundled: Path, tmp_path: Path, tiny_tiff: Path) -> None:
    src = bundled / name
    before = tree_digest(src)
    proj_dir, old, _, outcomes = add_result_to_copy(qp, src, tmp_path, tiny_tiff)
    assert [o.status for o in outcomes] == ["done"], outcomes
    check_written(proj_dir, old, old["images"], real_server_json(src, old["images"]))
    assert tree_digest(src) == before


def test_orphaned_data_folder_is_not_reused(qp, bundled: Path, tmp_path: Path, tiny_tiff: Path) -> None:
    src = qp.copy_tree(bundled / "own" / "0.4.0-synthetic", tmp_path / "src")
    (src / "data" / "7").mkdir()  # lastID is 6: a stray folder where the next entry would go
    (src / "data" / "7" / "keep.txt").write_text("not ours", encoding="utf-8")
    proj_dir, old, _, _ = add_result_to_copy(qp, src, tmp_path / "run", tiny_tiff)
    new = json.loads((proj_dir / "project.qpproj").read_text(encoding="utf-8"))
    assert new["images"][-1]["entryID"] == new["lastID"] == 8
    assert (proj_dir / "data" / "7" / "keep.txt").read_text(encoding="utf-8") == "not ours"


def test_file_permissions_are_kept(qp, bundled: Path, tmp_path: Path) -> None:
    proj_dir = qp.copy_tree(bundled / "own" / "0.5.1-synthetic", tmp_path / "p")
    os.chmod(proj_dir / "project.qpproj", 0o640)
    project = QuPathProject.open(proj_dir, "file")
    project.add_result("x", tmp_path / "x.ome.tiff", {"builderType": "uri", "uri": "file:/x"}, {})
    assert (proj_dir / "project.qpproj").stat().st_mode & 0o777 == 0o640
    assert len(QuPathProject.open(proj_dir, "file").entries) == 3


def test_lock_blocks_a_second_writer(tmp_path: Path) -> None:
    qpproj = tmp_path / "project.qpproj"
    qpproj.write_text("{}", encoding="utf-8")
    with project_lock(qpproj):
        with pytest.raises(ProjectError, match="locked by another lpfm process"):
            with project_lock(qpproj, timeout_s=0.2):
                pass
    assert not (tmp_path / ("project.qpproj" + LOCK_SUFFIX)).exists()


def test_readonly_project_refuses_to_write(bundled: Path) -> None:
    project = QuPathProject.open(bundled / "own" / "0.5.1-synthetic", "file", readonly=True)
    with pytest.raises(ProjectError, match="read-only"):
        project.add_result("x", Path("/tmp/x.ome.tiff"), {}, {})


def test_failed_write_leaves_no_trace(qp, bundled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lpfm_toolkit.integrations.qupath import files

    proj_dir = qp.copy_tree(bundled / "own" / "0.5.1-synthetic", tmp_path / "p")
    before = tree_digest(proj_dir)
    project = QuPathProject.open(proj_dir, "file")
    real = files.write_text_atomic

    def failing(path: Path, text: str) -> Path:
        if path.name == "project.qpproj":
            raise OSError("disk full")
        return real(path, text)

    monkeypatch.setattr(files, "write_text_atomic", failing)
    with pytest.raises(OSError, match="disk full"):
        project.add_result("x", tmp_path / "x.ome.tiff", {"builderType": "uri", "uri": "file:/x"}, {})
    after = tree_digest(proj_dir)
    after.pop("project.qpproj.backup", None)  # the backup of the unchanged file may exist
    assert after == before and not (proj_dir / "data" / "5").exists()


def test_whole_image_and_a_bad_annotation(qp, tmp_path: Path, tiny_tiff: Path) -> None:
    feats = [qp.box_feature(10, 10, 50, 40, "Tumor", "fine", "bbbbbbbb-0000-4000-8000-000000000001"),
             qp.box_feature(5000, 5000, 50, 50, "Tumor", "outside", "bbbbbbbb-0000-4000-8000-000000000002")]
    folder = qp.write_project(tmp_path / "p", tiny_tiff, "0.6.0", annotations=feats)
    project = QuPathProject.open(folder, "file")
    outcomes = enhance_project(project, "sr x2", get_engine("identity"), classes=["Tumor"], output_dir=tmp_path / "o")
    assert sorted((o.detail["region"], o.status) for o in outcomes) == [("Tumor: fine", "done"), ("Tumor: outside", "failed")]
    assert "outside" in next(o.error for o in outcomes if o.status == "failed")
    whole = enhance_project(project, "sr x2", get_engine("identity"), output_dir=tmp_path / "o")
    assert [(o.detail["region"], o.status) for o in whole] == [("whole image (level 0)", "done")]  # results are not re-enhanced
    entries = QuPathProject.open(folder, "file").entries
    assert entries[-1].name == "tiny.tif [lpfm sr×2]" and (entries[-1].width, entries[-1].height) == (600, 400)
    assert entries[-1].metadata["lpfm.source.region"] == "0,0,300,200"
    carried = project.annotations(entries[-1])
    assert [a.name for a in carried] == ["fine"] and carried[0].geometry.bounds == (20, 20, 120, 100)
