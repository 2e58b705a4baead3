"""QuPath GeoJSON: read exported objects as :class:`Annotation` s, write carried-over ones back.

QuPath (0.2 to 0.7) exports a ``FeatureCollection`` or a bare list of features. Each feature carries
``properties.objectType`` (``annotation``, ``detection``, ``cell``, …; 0.2 put ``PathAnnotationObject`` in
the feature ``id`` instead), an optional ``classification`` (``{name, color: [r, g, b]}``; 0.2:
``colorRGB``; derived classes may list ``names``), ``name``, ``isLocked``, ``measurements`` (a dict, or a list
of ``{name, value}`` before 0.4) and the non-standard ``geometry.isEllipse``. Coordinates are level-0 pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lpfm_toolkit.errors import ProjectError
from lpfm_toolkit.sources.base import Annotation

log = logging.getLogger(__name__)

_LEGACY_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                 "PathCellObject": "cell", "PathTileObject": "tile", "TMACoreObject": "tma_core"}
_NAMESPACE = uuid.UUID("6f1d3c1e-4b7a-4f0e-9a52-3c1f7e2b9d10")  # for ids of carried-over annotations


def _class_name(classification: Any) -> str | None:
    if not classification:
        return None
    if isinstance(classification, str):
        return classification
    if isinstance(classification, dict):
        if classification.get("name"):
            return str(classification["name"])
        names = classification.get("names")
        if names:
            return ": ".join(str(n) for n in names)
    return None


def _class_color(classification: Any) -> list[int] | None:
    if not isinstance(classification, dict):
        return None
    color = classification.get("color")
    if isinstance(color, list) and len(color) >= 3:
        return [int(c) for c in color[:3]]
    rgb = classification.get("colorRGB", color if isinstance(color, int) else None)
    if isinstance(rgb, int):
        rgb &= 0xFFFFFF
        return [(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255]
    return None


def _measurements(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):  # QuPath ≤ 0.3: [{"name": ..., "value": ...}]
        return {str(m["name"]): m.get("value") for m in value if isinstance(m, dict) and "name" in m}
    return {}


def _stable_id(geometry: dict[str, Any], props: dict[str, Any]) -> str:
    """An id for features that have none, so each annotation keeps one name across runs."""
    digest = hashlib.sha256(json.dumps([geometry, props.get("classification"), props.get("name")],
                                       sort_keys=True, default=str).encode()).hexdigest()
    return f"geom-{digest[:12]}"


def parse_feature(feature: dict[str, Any], source: str = "") -> Annotation:
    """One GeoJSON feature as an :class:`Annotation` (geometry in level-0 pixels)."""
    from shapely.geometry import shape

    if not isinstance(feature, dict) or "geometry" not in feature:
        raise ProjectError(f"{source or 'GeoJSON'}: a feature without geometry ({str(feature)[:80]})",
                           "export the objects from QuPath with File › Export objects as GeoJSON")
    geom_json = feature.get("geometry") or {}
    props = dict(feature.get("properties") or {})
    raw_id = feature.get("id")
    object_type = props.get("objectType") or _LEGACY_TYPES.get(str(raw_id), None) or "annotation"
    ann_id = str(raw_id) if raw_id is not None and str(raw_id) not in _LEGACY_TYPES else None
    try:
        geometry = shape(geom_json)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ProjectError(f"{source or 'GeoJSON'}: unreadable {geom_json.get('type')} geometry ({exc})",
                           "re-export the objects from QuPath") from exc
    classification = props.get("classification")
    properties: dict[str, Any] = {
        "objectType": object_type,
        "isLocked": bool(props.get("isLocked", False)),
        "isEllipse": bool(geom_json.get("isEllipse", False)),
        "measurements": _measurements(props.get("measurements")),
        "color": _class_color(classification),
    }
    for key, value in props.items():
        if key not in ("objectType", "classification", "name", "isLocked", "measurements"):
            properties.setdefault(key, value)
    return Annotation(geometry=geometry, class_name=_class_name(classification),
                      id=ann_id or _stable_id(geom_json, props), name=props.get("name"),
                      source=source, properties=properties)


def features_of(data: Any, source: str = "") -> list[dict[str, Any]]:
    """The feature list of a FeatureCollection, a bare list, or a single Feature."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection" or "features" in data:
            return list(data.get("features") or [])
        if data.get("type") == "Feature":
            return [data]
    raise ProjectError(f"{source or 'GeoJSON'} is neither a FeatureCollection nor a list of features",
                       "export the objects from QuPath with File › Export objects as GeoJSON")


def parse_geojson(data: Any, source: str = "", object_types: Sequence[str] | None = ("annotation",)) -> list[Annotation]:
    """Annotations of a QuPath GeoJSON document; ``object_types=None`` keeps every object type."""
    out = []
    for feature in features_of(data, source):
        ann = parse_feature(feature, source)
        if object_types is None or ann.properties["objectType"] in object_types:
            out.append(ann)
    return out


def read_geojson(path: Path, object_types: Sequence[str] | None = ("annotation",)) -> list[Annotation]:
    """Read a QuPath GeoJSON export (FeatureCollection or bare list)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise ProjectError(f"annotation file {path} does not exist",
                           "export it with the QuPath script export_annotations.groovy or pass --annotations") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProjectError(f"annotation file {path} is not valid JSON ({exc})",
                           "export it again from QuPath as GeoJSON") from exc
    return parse_geojson(data, source=str(path), object_types=object_types)


def select(annotations: Iterable[Annotation], classes: Sequence[str] | None = None,
           names: Sequence[str] | None = None, ids: Sequence[str] | None = None) -> list[Annotation]:
    """Annotations whose class is in ``classes`` and whose name or id is in ``names``/``ids`` (None: any)."""
    out = []
    for ann in annotations:
        if classes and ann.class_name not in classes:
            continue
        wanted = list(names or []) + list(ids or [])
        if wanted and ann.name not in wanted and ann.id not in wanted:
            continue
        out.append(ann)
    return out


def carry_over(annotations: Iterable[Annotation], region: Sequence[int], downsample: float, scale: float,
               key: str = "") -> list[Annotation]:
    """Annotations moved into an output's pixel space: clipped to ``region`` (x, y, w, h at a level of
    ``downsample``), shifted to its origin and scaled by ``scale`` (the super-resolution factor).
    """
    from shapely import affinity, make_valid
    from shapely.geometry import box

    x, y, w, h = region
    window = box(x * downsample, y * downsample, (x + w) * downsample, (y + h) * downsample)
    f = scale / downsample
    out = []
    for ann in annotations:
        geom = ann.geometry
        if geom is None or geom.is_empty or not geom.intersects(window):
            continue
        clipped = not window.covers(geom)
        if clipped:
            geom = _same_dimension(make_valid(geom).intersection(window), ann.geometry.geom_type)
            if geom is None:
                continue
        moved = affinity.affine_transform(geom, [f, 0.0, 0.0, f, -x * scale, -y * scale])
        props = dict(ann.properties)
        props["isEllipse"] = bool(props.get("isEllipse")) and not clipped
        props["measurements"] = {}  # measured on the original pixels; QuPath recomputes them
        props["lpfm.source.annotation"] = ann.id
        new_id = str(uuid.uuid5(_NAMESPACE, f"{key}:{ann.id}")) if ann.id else str(uuid.uuid4())
        out.append(Annotation(geometry=moved, class_name=ann.class_name, id=new_id, name=ann.name,
                              source=ann.source, properties=props))
    return out


def _same_dimension(geom: Any, original_type: str) -> Any:
    """Drop the lower-dimensional pieces (points, lines) that clipping can leave of a polygon."""
    from shapely.ops import unary_union

    if geom.is_empty:
        return None
    if geom.geom_type != "GeometryCollection":
        return geom
    dim = {"Point": 0, "MultiPoint": 0, "LineString": 1, "MultiLineString": 1}.get(original_type, 2)
    parts = [g for g in geom.geoms if not g.is_empty and
             {"Point": 0, "MultiPoint": 0, "LineString": 1, "MultiLineString": 1}.get(g.geom_type, 2) == dim]
    return unary_union(parts) if parts else None


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        r = round(value, digits)
        return int(r) if r == int(r) else r
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    return value


def to_feature(ann: Annotation) -> dict[str, Any]:
    """One annotation as a QuPath (0.4+) GeoJSON feature."""
    from shapely.geometry import mapping

    geom = mapping(ann.geometry)
    geometry: dict[str, Any] = {"type": geom["type"]}
    if "coordinates" in geom:
        geometry["coordinates"] = _round(geom["coordinates"])
    else:  # GeometryCollection left by clipping
        geometry["geometries"] = [{"type": g["type"], "coordinates": _round(g["coordinates"])}
                                  for g in geom["geometries"]]
    if ann.properties.get("isEllipse"):
        geometry["isEllipse"] = True
    props: dict[str, Any] = {"objectType": ann.properties.get("objectType", "annotation")}
    if ann.name:
        props["name"] = ann.name
    if ann.class_name:
        color = ann.properties.get("color") or [255, 0, 0]
        props["classification"] = {"name": ann.class_name, "color": list(color)}
    if ann.properties.get("isLocked"):
        props["isLocked"] = True
    if ann.properties.get("measurements"):
        props["measurements"] = ann.properties["measurements"]
    if ann.properties.get("lpfm.source.annotation"):
        props["metadata"] = {"lpfm.source.annotation": str(ann.properties["lpfm.source.annotation"])}
    feature: dict[str, Any] = {"type": "Feature"}
    if ann.id:
        feature["id"] = ann.id
    feature["geometry"] = geometry
    feature["properties"] = props
    return feature


def write_geojson(path: Path, annotations: Iterable[Annotation]) -> Path:
    """Write annotations as a QuPath-importable FeatureCollection, atomically."""
    from lpfm_toolkit.integrations.qupath.files import write_text_atomic

    doc = {"type": "FeatureCollection", "features": [to_feature(a) for a in annotations]}
    return write_text_atomic(Path(path), json.dumps(doc, ensure_ascii=False))
