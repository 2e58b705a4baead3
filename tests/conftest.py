"""Shared pytest options and fixtures.

Opt-in suites: ``--qupath`` (paquo against a real QuPath installation) and ``--omero-host`` … (a real
OMERO server). Without them those tests are skipped with a message saying so; a skip is never a pass.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE_SLIDE = REPO / "lpfm_toolkit" / "data" / "cmu_small_region.svs"
SAMPLE_SIZE = (2220, 2967)  # the bundled CMU cut, level 0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lpfm live suites")
    group.addoption("--qupath", action="store_true", default=False,
                    help="run the paquo backend tests (needs a QuPath installation, PAQUO_QUPATH_DIR)")
    group.addoption("--omero-host", default=os.environ.get("LPFM_TEST_OMERO_HOST"),
                    help="run the live OMERO suite against this server")
    group.addoption("--omero-port", default=os.environ.get("LPFM_TEST_OMERO_PORT", "4064"))
    group.addoption("--omero-user", default=os.environ.get("LPFM_TEST_OMERO_USER"))
    group.addoption("--omero-password", default=os.environ.get("LPFM_TEST_OMERO_PASSWORD"))
    group.addoption("--omero-group", default=os.environ.get("LPFM_TEST_OMERO_GROUP"))
    group.addoption("--omero-secure", default="true", help="use an encrypted connection (true/false)")


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    """The bundled CC0 sample slide (Aperio SVS, 2220×2967, 0.499 µm/px)."""
    return SAMPLE_SLIDE


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (QuPath fixtures); tests that need it skip loudly without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present: the real QuPath-written fixtures were NOT read")
    return SHARED


# -- QuPath sample projects (for tests/qupath and every other test that needs a project) --------------------
def copy_tree(src: Path, dst: Path) -> Path:
    """A writable copy of a fixture project (fixtures are read-only on disk)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def write_project(folder: Path, slide: Path, version: str = "0.5.1", annotations: list[dict] | None = None,
                  old_uri: str | None = None, image_uri: str | None = None, entry_metadata: dict | None = None,
                  bioformats: bool = False) -> Path:
    """A one-entry QuPath project around ``slide`` (entry 1), shaped like ``version``, with GeoJSON annotations.

    By default the entry is the bundled sample slide as QuPath's OpenSlide server describes it; ``bioformats``: any
    image, through the Bio-Formats server with only its name as metadata. ``entry_metadata``: the entry's key-value
    metadata (e.g. ``{"lpfm.enhance": "auto"}``).
    """
    from lpfm_toolkit.integrations.qupath.uris import uri_from_path

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
    server = "bioformats.BioFormatsServerBuilder" if bioformats else "openslide.OpenslideServerBuilder"
    builder = {"builderType": "uri", "providerClassName": f"qupath.lib.images.servers.{server}",
               "uri": image_uri or uri_from_path(slide.resolve()), "args": [],
               "metadata": {"name": slide.name} if bioformats else metadata}
    entry = {"serverBuilder": builder, "entryID": 1, "randomizedName": "0e1f2a3b-4c5d-4e6f-8a7b-9c0d1e2f3a4b",
             "imageName": slide.name, "metadata": dict(entry_metadata or {})}
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
