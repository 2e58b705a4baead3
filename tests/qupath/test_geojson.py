"""QuPath GeoJSON: every real export, this project's own fixtures, carrying annotations over to a result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shapely.geometry import Point, box

from lpfm_toolkit.errors import ProjectError
from lpfm_toolkit.integrations.qupath.geojson import (
    carry_over,
    parse_geojson,
    read_geojson,
    select,
    to_feature,
    write_geojson,
)
from lpfm_toolkit.sources.base import Annotation

# counts from reading the files by hand (jq): annotations, by class, geometry types
REAL = {
    "coscia-03012023-JN-locked.geojson": (6, {None: 3, "Tumor": 3}, {"Point", "Polygon"}),
    "coscia-TD01-mIF-2025.geojson": (9, {"class_1": 3, "class_2": 3, None: 3}, {"Point", "Polygon"}),
    "coscia-example2-multipolygon.geojson": (154, None, {"Point", "Polygon", "MultiPolygon"}),
    "coscia-objects-compact.geojson": (2, {"Tumor": 1, None: 1}, {"Polygon"}),
}


def test_every_real_geojson_export_is_read(qupath_fixtures: Path) -> None:
    files = sorted((qupath_fixtures / "geojson").glob("*.geojson"))
    assert {f.name for f in files} == set(REAL), "a new fixture appeared: add it to REAL"
    for f in files:
        anns = read_geojson(f)
        n, classes, types = REAL[f.name]
        raw = json.loads(f.read_text(encoding="utf-8"))["features"]
        assert len(anns) == n == len(raw)
        assert {a.geometry.geom_type for a in anns} == types
        assert [a.id for a in anns] == [feat["id"] for feat in raw]  # QuPath's UUIDs are kept
        assert all(a.geometry.is_valid or a.geometry.geom_type != "Point" for a in anns)
        if classes is not None:
            got: dict = {}
            for a in anns:
                got[a.class_name] = got.get(a.class_name, 0) + 1
            assert got == classes
        for a, feat in zip(anns, raw):
            cls = (feat["properties"].get("classification") or {})
            if cls:
                assert a.properties["color"] == cls["color"]
            assert a.properties["isLocked"] == feat["properties"].get("isLocked", False)
            assert a.properties["isEllipse"] == feat["geometry"].get("isEllipse", False)


def test_real_multipolygon_and_locked_details(qupath_fixtures: Path) -> None:
    anns = read_geojson(qupath_fixtures / "geojson" / "coscia-example2-multipolygon.geojson")
    multi = [a for a in anns if a.geometry.geom_type == "MultiPolygon"]
    assert len(multi) == 1 and len(multi[0].geometry.geoms) >= 2
    assert len(select(anns, classes=["C18"])) == 45
    locked = read_geojson(qupath_fixtures / "geojson" / "coscia-03012023-JN-locked.geojson")
    calib = select(locked, names=["calib1"])
    assert len(calib) == 1 and calib[0].geometry.equals(Point(11585.84, 14257.66)) and calib[0].properties["isLocked"]
    ellipses = [a for a in read_geojson(qupath_fixtures / "geojson" / "coscia-objects-compact.geojson")
                if a.properties["isEllipse"]]
    assert len(ellipses) == 2


def test_own_legacy_bare_list(bundled: Path) -> None:
    path = bundled / "own" / "geojson" / "qupath-0.3-bare-list.json"
    anns = read_geojson(path)
    assert [a.class_name for a in anns] == ["Tumor", "Stroma"]  # the detection is filtered out
    assert anns[0].properties["measurements"] == {"Area px^2": 60000.0, "Perimeter px": 1000.0}
    assert anns[0].properties["color"] == [200, 0, 0]  # colorRGB -3670016 = 0xFFC80000
    assert anns[1].properties["isLocked"] is True
    assert anns[0].id and anns[0].id != "PathAnnotationObject" and anns[0].id != anns[1].id
    assert read_geojson(path)[0].id == anns[0].id  # ids made up for id-less features are stable
    every = read_geojson(path, object_types=None)
    assert [a.properties["objectType"] for a in every] == ["annotation", "annotation", "detection"]


def test_own_featurecollection(bundled: Path) -> None:
    anns = read_geojson(bundled / "own" / "geojson" / "qupath-0.5-featurecollection.geojson")
    assert [a.geometry.geom_type for a in anns] == ["Polygon", "MultiPolygon", "Point"]
    assert anns[0].properties["isEllipse"] and anns[0].properties["measurements"]["Area µm^2"] == 1234.5
    assert anns[1].class_name == "Tumor: Positive" and anns[1].properties["isLocked"]
    assert select(anns, classes=["Tumor"]) == [anns[0]]
    assert select(anns, ids=["3f0c2b1a-0000-4000-8000-000000000003"]) == [anns[2]]


@pytest.mark.parametrize("doc", [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
                                  "properties": {}}, []])
def test_single_feature_and_empty_list(doc) -> None:
    assert len(parse_geojson(doc)) == (1 if doc else 0)


def test_malformed_geojson_is_a_project_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ProjectError, match="not valid JSON"):
        read_geojson(bad)
    with pytest.raises(ProjectError, match="neither a FeatureCollection"):
        parse_geojson({"type": "Polygon", "coordinates": []})
    with pytest.raises(ProjectError, match="unreadable Polygon"):
        parse_geojson([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0]]]}}])
    with pytest.raises(ProjectError, match="does not exist"):
        read_geojson(tmp_path / "missing.geojson")


def test_carry_over_scales_shifts_and_clips() -> None:
    inside = Annotation(box(110, 220, 150, 260), "Tumor", "a", "inside", properties={"isEllipse": True})
    across = Annotation(box(90, 200, 130, 240), "Stroma", "b", "across")
    outside = Annotation(box(0, 0, 10, 10), "Stroma", "c", "outside")
    point = Annotation(Point(120, 230), None, "d", "pt")
    # region (50, 100, 40, 50) at a level of downsample 2 = level-0 box (100, 200)-(180, 300); ×4 SR
    out = carry_over([inside, across, outside, point], (50, 100, 40, 50), downsample=2.0, scale=4, key="k")
    assert [a.name for a in out] == ["inside", "across", "pt"]
    assert out[0].geometry.equals(box((110 / 2 - 50) * 4, (220 / 2 - 100) * 4, (150 / 2 - 50) * 4, (260 / 2 - 100) * 4))
    assert out[0].properties["isEllipse"] is True  # uniform scaling keeps an ellipse an ellipse
    assert out[1].geometry.equals(box(0, 0, (130 / 2 - 50) * 4, (240 / 2 - 100) * 4))  # clipped at the left
    assert out[1].properties["isEllipse"] is False
    assert out[2].geometry.equals(Point((120 / 2 - 50) * 4, (230 / 2 - 100) * 4))
    assert all(a.properties["lpfm.source.annotation"] == src for a, src in zip(out, "abd"))
    again = carry_over([inside], (50, 100, 40, 50), downsample=2.0, scale=4, key="k")
    assert again[0].id == out[0].id != inside.id  # new, stable ids


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    anns = [Annotation(box(0, 0, 10.123456, 20), "Tumor", "11111111-2222-4333-8444-555555555555", "a",
                       properties={"color": [1, 2, 3], "isLocked": True, "isEllipse": True}),
            Annotation(Point(5, 6), None, "22222222-2222-4333-8444-555555555555", None)]
    path = write_geojson(tmp_path / "out.geojson", anns)
    back = read_geojson(path)
    assert [a.id for a in back] == [a.id for a in anns]
    assert back[0].geometry.equals_exact(anns[0].geometry, 1e-4)
    assert back[0].class_name == "Tumor" and back[0].properties["color"] == [1, 2, 3]
    assert back[0].properties["isLocked"] and back[0].properties["isEllipse"]
    assert back[1].class_name is None and to_feature(back[1])["geometry"] == {"type": "Point", "coordinates": [5, 6]}
