"""OmeroSink through the real pipeline: new images, channels mode, ROI copies, provenance, idempotency, faults."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)")

import Ice  # noqa: E402
import omero  # noqa: E402
import omero.model  # noqa: E402
from omero.rtypes import rdouble, rstring, unwrap  # noqa: E402

from lpfm_toolkit.engine.base import IdentityEngine  # noqa: E402
from lpfm_toolkit.integrations.omero import sink as sink_mod  # noqa: E402
from lpfm_toolkit.integrations.omero.session import OmeroSession, SessionLostError  # noqa: E402
from lpfm_toolkit.integrations.omero.sink import OmeroSink, rescale_mask  # noqa: E402
from lpfm_toolkit.integrations.omero.source import OmeroImageHandle  # noqa: E402
from lpfm_toolkit.pipeline import plan, run_item  # noqa: E402
from lpfm_toolkit.prompts import parse_prompt  # noqa: E402
from lpfm_toolkit.provenance import NAMESPACE, Provenance  # noqa: E402
from lpfm_toolkit.sources.base import Region  # noqa: E402

REGION = Region(100, 80, 120, 90)


@pytest.fixture
def slide(server, make_pyramid, make_rect):
    base = np.random.default_rng(3).integers(0, 256, (400, 500, 3), dtype=np.uint8)
    ds = server.add_dataset("slides")
    iid = server.add_image("slide.svs", make_pyramid(base, 2), dataset=ds, rgb_colours=True, mpp=0.5)
    server.add_roi(iid, make_rect(110, 90, 20, 10, "Tumor"), name="inside")
    poly = omero.model.PolygonI()
    poly.setPoints(rstring("120,100 140,100 140,120"))
    poly.setTextValue(rstring("Stroma"))
    server.add_roi(iid, poly)
    server.add_roi(iid, make_rect(400, 300, 20, 20, "Tumor"), name="outside")
    return iid, ds


def _run(server, settings, iid, *, prompt="sr x2", mode="new", force=False, uncertainty=False, dataset=None,
         region=REGION, annotations=None):
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        items = plan(h, parse_prompt(prompt), region=region if annotations is None else None,
                     annotations=annotations)
        sink = OmeroSink(s, h, mode=mode, dataset=dataset)
        return [run_item(h, item, IdentityEngine(), sink, tile_size=64, overlap=8, force=force,
                         samples_uncertainty=uncertainty) for item in items]


def _new_images(server, before):
    return sorted(set(server.images) - set(before))


def test_new_image_with_pixels_metadata_provenance_and_rois(server, settings, slide) -> None:
    iid, ds = slide
    before = dict(server.images)
    original = server.snapshot()
    (res,) = _run(server, settings, iid)
    assert not res.skipped
    (new,) = _new_images(server, before)
    assert res.output.extra["image_id"] == new and res.output.uri.endswith(f"/image/{new}")
    src = server.pixels_of(iid)[80:170, 100:220]
    np.testing.assert_array_equal(server.pixels_of(new), src.repeat(2, 0).repeat(2, 1))  # identity ×2
    assert new in server.images_in(ds)  # next to the original
    pix = server.images[new].obj.getPrimaryPixels()
    assert pix.getPhysicalSizeX().getValue() == pytest.approx(0.25)
    chans = [unwrap(c.getLogicalChannel().getName()) for c in pix.copyChannels()]
    assert chans == ["R", "G", "B"]
    assert [unwrap(c.getRed()) for c in pix.copyChannels()] == [255, 0, 0]
    pairs = server.map_of(new)
    assert pairs["lpfm.state"] == "complete" and pairs["lpfm.source.id"] == str(iid)
    assert pairs["lpfm.idempotency_key"] == res.provenance.idempotency_key
    assert pairs["lpfm.task"] == "super_resolution" and pairs["lpfm.task.scale"] == "2"
    files = [a for a in server.annotations_of(new) if isinstance(a, omero.model.FileAnnotationI)]
    assert len(files) == 1 and unwrap(files[0].getNs()) == NAMESPACE
    prov = Provenance.from_json(server.files[unwrap(files[0].getFile().getId())].decode())
    assert prov.output["image_id"] == new and prov.source["id"] == iid and prov.output["rois_copied"] == 2
    assert not any(k for k in json.loads(prov.to_json()) if "password" in k)
    # the ROIs touching the region, moved and doubled; the one outside is not copied
    shapes = [s for roi in server.images[new].rois for s in roi.copyShapes()]
    rect = next(s for s in shapes if isinstance(s, omero.model.RectangleI))
    assert [unwrap(v) for v in (rect.getX(), rect.getY(), rect.getWidth(), rect.getHeight())] == [20, 20, 40, 20]
    assert unwrap(rect.getTextValue()) == "Tumor"
    poly = next(s for s in shapes if isinstance(s, omero.model.PolygonI))
    assert unwrap(poly.getPoints()) == "40,40 80,40 80,80"
    assert {i: b for i, b in server.snapshot().items() if i in original} == original  # originals untouched


def test_rerun_creates_nothing(server, settings, slide) -> None:
    iid, _ = slide
    (first,) = _run(server, settings, iid)
    n = len(server.images)
    (again,) = _run(server, settings, iid)
    assert again.skipped and len(server.images) == n
    assert again.output.extra["image_id"] == first.output.extra["image_id"]
    assert again.provenance.output_sha256 == first.provenance.output_sha256
    (forced,) = _run(server, settings, iid, force=True)
    assert not forced.skipped and len(server.images) == n + 1


def test_large_results_are_written_tile_by_tile_in_order(server, settings, slide, monkeypatch) -> None:
    iid, ds = slide
    monkeypatch.setattr(sink_mod, "SMALL_BYTES", 0)
    monkeypatch.setattr(sink_mod, "SPOOL_BYTES", 0)  # and spooled to a temporary file
    server.tile = (64, 48)
    before = dict(server.images)
    (res,) = _run(server, settings, iid)
    (new,) = _new_images(server, before)
    im = server.images[new]
    assert im.saved and len(im.write_log) == 3 * 4 * 4  # channels × rows × columns of 64×48 tiles over 240×180
    src = server.pixels_of(iid)[80:170, 100:220]
    np.testing.assert_array_equal(im.levels[0], src.repeat(2, 0).repeat(2, 1))
    assert new in server.images_in(ds) and server.map_of(new)["lpfm.state"] == "complete"
    assert not list(Path(tempfile.gettempdir()).glob("lpfm-omero-*.raw"))  # the spool file is gone


def test_planes_over_the_message_size_go_tile_by_tile(server, settings, slide) -> None:
    iid, _ = slide
    server.message_size_kb = 64  # a 240×180 plane (42 KiB) is over half of it: no whole-plane upload
    before = dict(server.images)
    _run(server, settings, iid)
    (new,) = _new_images(server, before)
    assert "createImage" in server.calls and "createImageFromNumpySeq" not in server.calls
    assert server.images[new].write_log and server.map_of(new)["lpfm.state"] == "complete"


def test_channels_mode_holds_original_enhanced_and_uncertainty(server, settings, slide) -> None:
    iid, _ = slide
    before = dict(server.images)
    (res,) = _run(server, settings, iid, mode="channels", uncertainty=True)
    (new,) = _new_images(server, before)
    px = server.pixels_of(new)
    assert px.shape == (180, 240, 7)
    src = server.pixels_of(iid)[80:170, 100:220].repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(px[:, :, :3], src)  # original, pixel-replicated
    np.testing.assert_array_equal(px[:, :, 3:6], src)  # identity engine output
    assert (px[:, :, 6] == 0).all()  # a deterministic engine: zero spread
    names = [unwrap(c.getLogicalChannel().getName())
             for c in server.images[new].obj.getPrimaryPixels().copyChannels()]
    assert names[:3] == ["R (original)", "G (original)", "B (original)"]
    assert names[3] == "R (sr×2)" and names[6] == "uncertainty (sr×2)"
    assert res.provenance.output["mode"] == "channels" and res.provenance.output["uncertainty_channel"] == 6
    # the same work as a plain image is a different result
    (plain,) = _run(server, settings, iid)
    assert not plain.skipped


def test_results_into_a_named_dataset_created_once(server, settings, slide) -> None:
    iid, _ = slide
    _run(server, settings, iid, dataset="lpfm results")
    _run(server, settings, iid, dataset="lpfm results", prompt="denoise")
    named = [d for d, obj in server.datasets.items() if unwrap(obj.getName()) == "lpfm results"]
    assert len(named) == 1 and len(server.images_in(named[0])) == 2


def test_a_dataset_of_another_group_is_refused_before_any_work(server, settings, slide) -> None:
    iid, _ = slide
    elsewhere = server.add_dataset("other lab's", group=5)
    before = server.snapshot()
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        item = plan(h, parse_prompt("sr x2"), region=REGION)[0]

        class Watched(IdentityEngine):
            def process(self, tiles, task, seeds):
                raise AssertionError("the engine ran although the target was refused")

        with pytest.raises(PermissionError, match="does not link across groups"):
            run_item(h, item, Watched(), OmeroSink(s, h, dataset=str(elsewhere)))
    assert server.snapshot() == before


def test_permission_denied_leaves_nothing(server, settings, slide) -> None:
    iid, _ = slide
    server.read_only_groups.add(3)
    before = server.snapshot()
    with pytest.raises(PermissionError, match="OMERO refused to write"):
        _run(server, settings, iid)
    assert server.snapshot() == before


def test_permission_denied_after_the_image_exists_deletes_it(server, settings, slide) -> None:
    iid, _ = slide
    server.inject("createFileAnnfromLocalFile", omero.SecurityViolation(None, None, "annotations are read-only"))
    before = server.snapshot()
    with pytest.raises(PermissionError):
        _run(server, settings, iid)
    assert server.snapshot() == before and server.deleted


def test_connection_lost_during_upload_reconnects_and_uploads_once(server, settings, slide, monkeypatch) -> None:
    iid, _ = slide
    monkeypatch.setattr(sink_mod, "SMALL_BYTES", 0)
    server.tile = (64, 64)
    server.inject("setTile", Ice.ConnectionLostException(), after=4)
    before = dict(server.images)
    (res,) = _run(server, settings, iid)
    new = _new_images(server, before)
    assert new == [res.output.extra["image_id"]]  # the partial one was deleted, one complete image remains
    assert len(server.deleted) == 1 and server.map_of(new[0])["lpfm.state"] == "complete"
    src = server.pixels_of(iid)[80:170, 100:220]
    np.testing.assert_array_equal(server.pixels_of(new[0]), src.repeat(2, 0).repeat(2, 1))


def test_session_expired_mid_upload_cleans_up_and_explains(server, slide) -> None:
    from lpfm_toolkit.integrations.omero.session import OmeroSettings

    iid, _ = slide
    before = server.snapshot()
    # the session dies after the image exists; its key dies with it, so no reconnect can help
    server.inject("createFileAnnfromLocalFile", omero.RemovedSessionException(None, None, "expired"), kills=True)
    with OmeroSession(OmeroSettings(host="h", session_key="session-key-1")) as s, OmeroImageHandle(s, iid) as h:
        item = plan(h, parse_prompt("sr x2"), region=REGION)[0]
        sink = OmeroSink(s, h)
        server.valid_session_keys.clear()
        with pytest.raises(SessionLostError, match="could not be deleted") as info:
            run_item(h, item, IdentityEngine(), sink, tile_size=64, overlap=8)
    (leftover,) = [i for i in server.images if i not in before]
    assert f"partial image {leftover}" in str(info.value) and "next run" in str(info.value)
    assert server.map_of(leftover)["lpfm.state"] == "writing"
    # the next run (a new session) deletes the marked leftover and makes one complete result
    server.valid_session_keys.add("session-key-2")
    with OmeroSession(OmeroSettings(host="h", session_key="session-key-2")) as s, OmeroImageHandle(s, iid) as h:
        item = plan(h, parse_prompt("sr x2"), region=REGION)[0]
        res = run_item(h, item, IdentityEngine(), OmeroSink(s, h), tile_size=64, overlap=8)
    new = [i for i in server.images if i not in before]
    assert new == [res.output.extra["image_id"]] and leftover in server.deleted
    assert server.map_of(new[0])["lpfm.state"] == "complete"


def test_engine_failure_sends_nothing(server, settings, slide) -> None:
    iid, _ = slide

    class Broken(IdentityEngine):
        def process(self, tiles, task, seeds):
            raise RuntimeError("model crashed")

    before = server.snapshot()
    calls = len(server.calls)
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h, pytest.raises(RuntimeError):
        run_item(h, plan(h, parse_prompt("sr x2"), region=REGION)[0], Broken(), OmeroSink(s, h))
    assert server.snapshot() == before
    assert not {"createImageFromNumpySeq", "createImage", "saveObject"} & set(server.calls[calls:])


def test_roi_work_items_and_mask_rescaling(server, settings, slide) -> None:
    iid, _ = slide
    with OmeroSession(settings) as s, OmeroImageHandle(s, iid) as h:
        tumours = [a for a in h.annotations() if a.class_name == "Tumor"]
    results = _run(server, settings, iid, annotations=tumours)
    assert [r.item.region.as_tuple() for r in results] == [(110, 90, 20, 10), (400, 300, 20, 20)]
    shapes = [s for s in server.images[results[0].output.extra["image_id"]].rois[0].copyShapes()]
    assert [unwrap(v) for v in (shapes[0].getX(), shapes[0].getY(), shapes[0].getWidth())] == [0, 0, 40]
    bits = np.zeros((2, 3), np.uint8)
    bits[0, 1] = 1
    out = np.unpackbits(np.frombuffer(rescale_mask(np.packbits(bits.ravel()).tobytes(), 3, 2, 6, 4), np.uint8))
    assert out[:24].reshape(4, 6).tolist() == [[0, 0, 1, 1, 0, 0]] * 2 + [[0] * 6] * 2


def test_transformed_shape_keeps_coordinates_and_composes_the_mapping(server, settings, slide, make_rect) -> None:
    iid, _ = slide
    r = make_rect(0, 0, 10, 10, "Tumor")
    t = omero.model.AffineTransformI()
    for name, v in (("A00", 1.0), ("A01", 0.0), ("A10", 0.0), ("A11", 1.0), ("A02", 150.0), ("A12", 100.0)):
        getattr(t, f"set{name}")(rdouble(v))
    r.setTransform(t)
    server.add_roi(iid, r, name="moved")
    before = dict(server.images)
    _run(server, settings, iid)
    (new,) = _new_images(server, before)
    moved = [s for roi in server.images[new].rois if unwrap(roi.getName()) == "moved" for s in roi.copyShapes()]
    nt = moved[0].getTransform()
    assert [unwrap(nt.getA00()), unwrap(nt.getA02()), unwrap(nt.getA12())] == [2.0, 100.0, 40.0]
    assert unwrap(moved[0].getWidth()) == 10


def test_a_partial_result_of_another_user_is_left_alone(server, settings, slide) -> None:
    iid, _ = slide
    (first,) = _run(server, settings, iid)
    other = first.output.extra["image_id"]
    for ann in server.annotations_of(other):  # pretend another user's run died mid-upload
        if isinstance(ann, omero.model.MapAnnotationI):
            ann.setMapValue([omero.model.NamedValue(nv.name, "writing" if nv.name == "lpfm.state" else nv.value)
                             for nv in ann.getMapValue()])
    server.images[other].obj.getDetails().setOwner(omero.model.ExperimenterI(99, False))
    (again,) = _run(server, settings, iid)
    assert not again.skipped and other in server.images and other not in server.deleted


# -- find() deletes only provably abandoned uploads of ours (issue 10) ------------------------------------------

def _mark(server, image_id: int, **pairs: str) -> None:
    """Rewrite the lpfm marker of ``image_id`` (state, writer …) as if another run had left it so."""
    for ann in server.annotations_of(image_id):
        if isinstance(ann, omero.model.MapAnnotationI):
            values = {nv.name: nv.value for nv in ann.getMapValue()}
            values.update(pairs)
            values = {k: v for k, v in values.items() if v is not None}
            ann.setMapValue([omero.model.NamedValue(k, v) for k, v in values.items()])


def _drop_provenance_file(server, image_id: int) -> None:
    server.image_ann_links = [(i, a) for i, a in server.image_ann_links
                              if not (i == image_id and isinstance(server.annotations[a], omero.model.FileAnnotationI))]


def test_a_complete_result_whose_provenance_file_was_removed_is_kept_and_reused(server, settings, slide) -> None:
    iid, _ = slide
    (first,) = _run(server, settings, iid)
    done = first.output.extra["image_id"]
    _drop_provenance_file(server, done)
    (again,) = _run(server, settings, iid)
    assert again.skipped and again.output.extra["image_id"] == done
    assert done in server.images and done not in server.deleted
    assert again.provenance.idempotency_key == first.provenance.idempotency_key
    assert again.provenance.output["rebuilt_from"] and again.output.extra["provenance_file"] is False


def test_a_partial_upload_of_a_live_or_unknown_writer_is_left_alone(server, settings, slide) -> None:
    import socket
    import subprocess
    import sys

    iid, _ = slide
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        writers = {"live process here": f"{socket.gethostname()}:{live.pid}:abc",
                   "another host": "elsewhere.example.org:1:abc", "no writer (older version)": None}
        for why, writer in writers.items():
            (first,) = _run(server, settings, iid, force=True)
            partial = first.output.extra["image_id"]
            _mark(server, partial, **{"lpfm.state": "writing", "lpfm.writer": writer})
            (again,) = _run(server, settings, iid)
            assert not again.skipped, why
            assert partial in server.images and partial not in server.deleted, why
            for done in (partial, again.output.extra["image_id"]):  # out of the way of the next case
                _mark(server, done, **{"lpfm.state": "kept by the lab"})
    finally:
        live.kill()
        live.wait()


def test_a_partial_upload_of_a_dead_writer_of_ours_is_deleted(server, settings, slide) -> None:
    import socket
    import subprocess
    import sys

    iid, _ = slide
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (first,) = _run(server, settings, iid)
    partial = first.output.extra["image_id"]
    _mark(server, partial, **{"lpfm.state": "writing", "lpfm.writer": f"{socket.gethostname()}:{dead.pid}:abc"})
    (again,) = _run(server, settings, iid)
    assert not again.skipped and partial in server.deleted
    assert server.map_of(again.output.extra["image_id"])["lpfm.state"] == "complete"


def test_an_upload_in_progress_in_this_process_is_not_deleted(server, settings, slide) -> None:
    iid, _ = slide
    (first,) = _run(server, settings, iid)
    partial = first.output.extra["image_id"]
    _mark(server, partial, **{"lpfm.state": "writing", "lpfm.writer": sink_mod.writer_id()})
    sink_mod._UPLOADING.add(partial)  # as if another thread of this process were still uploading it
    try:
        (again,) = _run(server, settings, iid)
    finally:
        sink_mod._UPLOADING.discard(partial)
    assert not again.skipped and partial in server.images and partial not in server.deleted
    assert "lpfm.writer" not in server.map_of(again.output.extra["image_id"])  # gone once complete


def test_a_marker_with_another_state_or_a_foreign_key_annotation_is_left_alone(server, settings, slide) -> None:
    iid, _ = slide
    (first,) = _run(server, settings, iid)
    image = first.output.extra["image_id"]
    _mark(server, image, **{"lpfm.state": "archived by the lab"})
    (again,) = _run(server, settings, iid)
    assert not again.skipped and image in server.images and image not in server.deleted
