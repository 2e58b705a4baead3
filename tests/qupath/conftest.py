"""Fixtures for the QuPath tests: real QuPath-written projects (../shared), bundled copies, sample projects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lpfm_toolkit.integrations.qupath.uris import uri_from_path

DATA = Path(__file__).resolve().parents[1] / "data" / "qupath"
SAMPLE_SIZE = (2220, 2967)  # the bundled CMU cut, level 0


@pytest.fixture(scope="session")
def qupath_fixtures(shared_dir: Path) -> Path:
    """``../shared/fixtures/qupath`` (skips loudly when absent: the real files were NOT read)."""
    root = shared_dir / "fixtures" / "qupath"
    if not root.is_dir():
        pytest.skip(f"{root} not present: the real QuPath-written fixtures were NOT read")
    return root


@pytest.fixture(scope="session")
def bundled() -> Path:
    """``tests/data/qupath``: MIT-licensed real projects and this project's own fixtures."""
    return DATA


def copy_tree(src: Path, dst: Path) -> Path:
    """A writable copy of a fixture project (fixtures are read-only on disk)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def write_project(folder: Path, slide: Path, version: str = "0.5.1", annotations: list[dict] | None = None,
                  old_uri: str | None = None, image_uri: str | None = None) -> Path:
    """A one-entry QuPath project around ``slide`` (entry 1), shaped like ``version``, with GeoJSON annotations."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = SAMPLE_SIZE
    metadata = {"name": slide.name, "width": w, "height": h, "sizeZ": 1, "sizeT": 1, "channelType": "DEFAULT",
                "isRGB": True, "pixelType": "UINT8", "levels": [{"downsample": 1.0, "width": w, "height": h}],
                "channels": [{"name": "Red", "color": -65536}, {"name": "Green", "color": -16711936},
                             {"name": "Blue", "color": -16776961}],
                "pixelCalibration": {"pixelWidth": {"value": 0.499, "unit": "µm"},
                                     "pixelHeight": {"value": 0.499, "unit": "µm"},
                                     "zSpacing": {"value": 1.0, "unit": "z-slice"}, "timeUnit": "SECONDS",
                                     "timepoints": []},
                "preferredTileWidth": 240, "preferredTileHeight": 240}
    builder = {"builderType": "uri", "providerClassName": "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
               "uri": image_uri or uri_from_path(slide.resolve()), "args": [], "metadata": metadata}
    entry = {"serverBuilder": builder, "entryID": 1, "randomizedName": "0e1f2a3b-4c5d-4e6f-8a7b-9c0d1e2f3a4b",
             "imageName": slide.name, "metadata": {}}
    if version.startswith("0.7"):
        entry["tags"] = []
    project = {"version": version, "createTimestamp": 1700000000000, "modifyTimestamp": 1700000000000,
               "uri": old_uri or uri_from_path((folder / "project.qpproj").resolve()), "lastID": 1, "images": [entry]}
    (folder / "project.qpproj").write_text(json.dumps(project, indent=2, ensure_ascii=False), encoding="utf-8")
    if annotations is not None:
        (folder / "annotations").mkdir(exist_ok=True)
        doc = {"type": "FeatureCollection", "features": annotations}
        (folder / "annotations" / "1.geojson").write_text(json.dumps(doc), encoding="utf-8")
    return folder


def box_feature(x: float, y: float, w: float, h: float, cls: str | None, name: str, ident: str) -> dict:
    """A rectangular QuPath 0.4+ annotation feature."""
    props: dict = {"objectType": "annotation", "name": name}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0] if cls == "Tumor" else [0, 150, 0]}
    return {"type": "Feature", "id": ident,
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": props}


@pytest.fixture(scope="session")
def qp() -> object:
    """The helpers above, for test modules (``--import-mode=importlib`` cannot import conftest)."""

    class Helpers:
        copy_tree = staticmethod(copy_tree)
        write_project = staticmethod(write_project)
        box_feature = staticmethod(box_feature)
        sample_size = SAMPLE_SIZE

    return Helpers
