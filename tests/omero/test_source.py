"""OmeroImageHandle: metadata, pyramid tiles within the server's limits, faults while reading, ROIs → shapely."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)")

import Ice  # noqa: E402
import omero  # noqa: E402
import omero.model  # noqa: E402
from omero.rtypes import rdouble, rint, rstring  # noqa: E402

from lpfm_toolkit.integrations.omero.session import OmeroSession  # noqa: E402
from lpfm_toolkit.integrations.omero.source import OmeroImageHandle, parse_points, roi_annotations  # noqa: E402


@pytest.fixture
def rgb(server, make_pyramid):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    ds = server.add_dataset("slides")
    iid = server.add_image("slide.svs", make_pyramid(base, 3), dataset=ds, rgb_colours=True, mpp=0.25)
    return iid, ds


def test_metadata_from_pixels_and_resolution_descriptions(server, settings, rgb) -> None:
    iid, ds = rgb
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        assert h.channel_names == ["R", "G", "B"] and h.is_rgb
        assert [(lv.width, lv.height) for lv in h.levels] == [(900, 700), (450, 350), (225, 175)]
        assert [lv.downsample for lv in h.levels] == [1.0, 2.0, 4.0]
        assert h.mpp == (0.25, 0.25) and h.dtype == np.uint8
        assert h.uri == f"omero://omero.example.org/image/{iid}" and h.source_id == iid
        assert h.dataset_ids == [ds]
        assert h.fingerprint().startswith("omero:db-uuid-1:image:")
        assert h.describe()["size"] == {"x": 900, "y": 700, "z": 1, "c": 3, "t": 1}


def test_pixel_size_in_micrometres_whatever_the_stored_unit(server, settings) -> None:
    iid = server.add_image("nm.tiff", [np.zeros((32, 32, 1), np.uint16)], mpp=250.0, unit="NANOMETER")
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        assert h.mpp == pytest.approx((0.25, 0.25))


def test_read_region_at_every_level(server, settings, rgb) -> None:
    iid, _ = rgb
    levels = server.images[iid].levels
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        np.testing.assert_array_equal(h.read_region(0, 10, 20, 300, 200), levels[0][20:220, 10:310])
        np.testing.assert_array_equal(h.read_region(2, 0, 0, 225, 175), levels[2])
        np.testing.assert_array_equal(h.read_region(1, 100, 50, 50, 60), levels[1][50:110, 100:150])
    # OMERO numbers resolution levels from the smallest: level 0 (full size) is n-1 on the wire
    assert {lv for lv, *_ in server.tile_requests} == {0, 1, 2}


def test_multichannel_uint16_fluorescence(server, settings, make_pyramid) -> None:
    base = np.random.default_rng(1).integers(0, 65535, (300, 260, 4), dtype=np.uint16)
    iid = server.add_image("if.ome.tiff", make_pyramid(base, 2), channel_names=["DAPI", "CD3", "CD8", "PanCK"])
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        assert h.channel_names == ["DAPI", "CD3", "CD8", "PanCK"] and not h.is_rgb
        assert h.dtype == np.uint16
        np.testing.assert_array_equal(h.read_region(0, 0, 0, 260, 300), base)


def test_requests_stay_within_plane_and_message_limits(server, settings, rgb) -> None:
    iid, _ = rgb
    server.max_plane = (200, 150)
    server.message_size_kb = 40  # 20 KiB per request at most: 20480 one-byte pixels
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        out = h.read_region(0, 0, 0, 900, 700)
    np.testing.assert_array_equal(out, server.images[iid].levels[0])
    assert server.tile_requests
    for _, _, _, w, h_ in server.tile_requests:
        assert w <= 200 and h_ <= 150 and w * h_ <= 20 * 1024


def test_memory_limit_exception_halves_the_request(server, settings, rgb) -> None:
    iid, _ = rgb
    server.inject("getTile", Ice.MemoryLimitException())
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        out = h.read_region(0, 0, 0, 900, 700)
    np.testing.assert_array_equal(out, server.images[iid].levels[0])
    sizes = {(w, h_) for _, _, _, w, h_ in server.tile_requests}
    assert max(w for w, _ in sizes) <= 450  # after the fault, halves


def test_connection_lost_mid_tile_loop_resumes(server, settings, rgb) -> None:
    iid, _ = rgb
    server.max_plane = (256, 256)
    server.inject("getTile", Ice.ConnectionLostException(), after=5)
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        out = h.read_region(0, 0, 0, 900, 700)
        assert s.reconnects == 1
    np.testing.assert_array_equal(out, server.images[iid].levels[0])
    assert len(server.gateways) == 2 and server.gateways[0].alive is False


def test_connection_lost_twice_in_a_row_fails_clearly(server, settings, rgb) -> None:
    iid, _ = rgb
    server.inject("getTile", Ice.ConnectionLostException(), after=2, times=2)
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h, pytest.raises(Ice.ConnectionLostException):
        h.read_region(0, 0, 0, 900, 700)


def test_permission_denied_reading_pixels(server, settings, rgb) -> None:
    iid, _ = rgb
    server.inject("setPixelsId", omero.SecurityViolation(None, None, "not yours"))
    with OmeroSession(settings) as s, pytest.raises(PermissionError, match=f"read the pixels of image {iid}"):
        OmeroImageHandle(s, iid)


def test_image_in_another_group_is_found_and_read_in_its_group(server, settings, make_pyramid) -> None:
    base = np.zeros((64, 64, 3), np.uint8)
    iid = server.add_image("other.svs", [base], group=5, rgb_colours=True)
    with OmeroSession(settings) as s:
        with OmeroImageHandle(s, iid) as h:
            assert s.conn.SERVICE_OPTS.getOmeroGroup() == "5"
            assert h.read_region(0, 0, 0, 64, 64).shape == (64, 64, 3)
        conn = s.conn
    assert conn.SERVICE_OPTS.getOmeroGroup() is None


def test_missing_image_is_a_clear_error(server, settings) -> None:
    with OmeroSession(settings) as s, pytest.raises(FileNotFoundError, match="OMERO image 999 does not exist"):
        OmeroImageHandle(s, 999)


def _shape(cls, **values):
    s = cls()
    for k, v in values.items():
        setter = getattr(s, f"set{k}")
        setter(rstring(v) if isinstance(v, str) else rdouble(v) if isinstance(v, float) else rint(v))
    return s


def test_rois_become_shapely_with_their_class(server, settings, rgb, make_rect) -> None:
    iid, _ = rgb
    ellipse = _shape(omero.model.EllipseI, X=100.0, Y=100.0, RadiusX=20.0, RadiusY=10.0)
    polygon = _shape(omero.model.PolygonI, Points="10,10 60,10 60,40 10,40", TextValue="Stroma")
    polyline = _shape(omero.model.PolylineI, Points="0,0 5,5 10,0")
    line = _shape(omero.model.LineI, X1=1.0, Y1=2.0, X2=11.0, Y2=2.0)
    point = _shape(omero.model.PointI, X=5.0, Y=6.0)
    mask = _shape(omero.model.MaskI, X=200.0, Y=300.0, Width=16.0, Height=8.0)
    moved = make_rect(0, 0, 10, 10, "Tumor")
    t = omero.model.AffineTransformI()
    for name, v in (("A00", 2.0), ("A01", 0.0), ("A10", 0.0), ("A11", 2.0), ("A02", 100.0), ("A12", 50.0)):
        getattr(t, f"set{name}")(rdouble(v))
    moved.setTransform(t)
    server.add_roi(iid, make_rect(10, 20, 30, 40, "Tumor"), ellipse, name="first", description="necrosis")
    server.add_roi(iid, polygon, polyline, line, point, mask, moved, name="second")
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        anns = h.annotations()
    by_type = {a.properties["type"]: a for a in anns}
    assert set(by_type) == {"Rectangle", "Ellipse", "Polygon", "Polyline", "Line", "Point", "Mask"}
    rects = [a for a in anns if a.properties["type"] == "Rectangle"]
    assert rects[0].geometry.bounds == (10, 20, 40, 60) and rects[0].class_name == "Tumor"
    assert rects[1].geometry.bounds == (100, 50, 120, 70)  # the affine transform is applied
    assert by_type["Ellipse"].class_name == "first"  # no text: the ROI's name
    assert by_type["Ellipse"].geometry.bounds == pytest.approx((80, 90, 120, 110), abs=0.01)
    assert by_type["Polygon"].class_name == "Stroma" and by_type["Polygon"].geometry.area == 1500
    assert by_type["Polyline"].geometry.geom_type == "LineString"
    assert by_type["Line"].geometry.length == 10
    assert by_type["Point"].geometry.coords[0] == (5, 6)
    assert by_type["Mask"].geometry.bounds == (200, 300, 216, 308)
    assert all(a.source.endswith(f"/image/{iid}") and a.id.startswith("Shape:") for a in anns)


def test_roi_class_falls_back_to_description() -> None:
    roi = omero.model.RoiI(1, True)
    roi.setDescription(rstring("Immune"))
    s = _shape(omero.model.PointI, X=1.0, Y=1.0)
    s.setId(omero.rtypes.rlong(2))
    roi.addShape(s)
    assert roi_annotations([roi], "omero://h/image/1")[0].class_name == "Immune"


def test_parse_points_old_and_new_formats() -> None:
    assert parse_points("1,2 3.5,4") == [(1, 2), (3.5, 4)]
    assert parse_points("points[1,2, 3,4] points1[1,2, 3,4]") == [(1, 2), (3, 4)]


def test_a_failed_setpixelsid_closes_the_raw_pixels_store(server, settings, rgb) -> None:
    from lpfm_toolkit.integrations.omero.session import OmeroPermissionError

    iid, _ = rgb
    server.inject("setPixelsId", omero.SecurityViolation(None, None, "no"))
    with OmeroSession(settings) as s:
        with pytest.raises(OmeroPermissionError):
            OmeroImageHandle(s, iid)
        i = len(server.calls) - 1 - server.calls[::-1].index("setPixelsId")
        assert server.calls[i + 1 :] == ["close"]  # the stateful service was closed, nothing else happened
