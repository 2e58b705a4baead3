"""The live suite: read, write, ROIs, provenance and idempotency against a real OMERO server.

Off unless ``--omero-host`` (or ``LPFM_TEST_OMERO_HOST``) is given, with ``--omero-user`` and
``--omero-password``. It creates a dataset holding a small synthetic image with two ROIs, runs the toolkit on
it, checks the results, and deletes everything it created. Use a test user and group.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)")

import omero.model  # noqa: E402
from omero.rtypes import rdouble, rint, rstring, unwrap  # noqa: E402

from lpfm_toolkit.integrations.omero.session import OmeroSession, OmeroSettings  # noqa: E402
from lpfm_toolkit.integrations.omero.source import OmeroImageHandle  # noqa: E402
from lpfm_toolkit.integrations.omero.workflow import enhance_omero, new_image_ids  # noqa: E402
from lpfm_toolkit.options import EngineOptions  # noqa: E402
from lpfm_toolkit.provenance import NAMESPACE, Provenance  # noqa: E402

pytestmark = pytest.mark.omero_live


@pytest.fixture(scope="module")
def live_settings(request: pytest.FixtureRequest) -> OmeroSettings:
    opt = request.config.getoption
    if not opt("--omero-host"):
        pytest.skip("live OMERO suite not run: no --omero-host given (nothing here was checked against a server)")
    if not (opt("--omero-user") and opt("--omero-password")):
        pytest.skip("live OMERO suite not run: --omero-user and --omero-password are needed")
    return OmeroSettings(host=opt("--omero-host"), port=int(opt("--omero-port")), user=opt("--omero-user"),
                         password=opt("--omero-password"), group=opt("--omero-group"),
                         secure=str(opt("--omero-secure")).lower() not in ("0", "false", "no"))


@pytest.fixture(scope="module")
def live(live_settings: OmeroSettings) -> Iterator[dict[str, Any]]:
    """A test dataset with a 600×500 RGB image and ROIs of classes Tumor and Stroma; all deleted afterwards."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:500, 0:600]
    base = np.stack([(xx * 255 // 600), (yy * 255 // 500), rng.integers(0, 255, (500, 600))], -1).astype(np.uint8)
    with OmeroSession(live_settings) as s:
        conn = s.conn
        ds = omero.model.DatasetI()
        ds.setName(rstring("lpfm-toolkit live test"))
        ds = conn.getUpdateService().saveAndReturnObject(ds, conn.SERVICE_OPTS)
        ds_id = int(unwrap(ds.getId()))
        dataset = conn.getObject("Dataset", ds_id)
        image = conn.createImageFromNumpySeq((base[:, :, c] for c in range(3)), "lpfm-live-synthetic", sizeC=3,
                                             dataset=dataset)
        iid = int(image.getId())
        pixels = conn.getQueryService().get("Pixels", int(image.getPixelsId()), conn.SERVICE_OPTS)
        pixels.setPhysicalSizeX(omero.model.LengthI(0.5, omero.model.enums.UnitsLength.MICROMETER))
        pixels.setPhysicalSizeY(omero.model.LengthI(0.5, omero.model.enums.UnitsLength.MICROMETER))
        conn.getUpdateService().saveObject(pixels, conn.SERVICE_OPTS)
        rois = []
        for x, y, w, h, cls in ((50, 60, 100, 80, "Tumor"), (300, 200, 120, 90, "Stroma")):
            r = omero.model.RectangleI()
            r.setX(rdouble(x))
            r.setY(rdouble(y))
            r.setWidth(rdouble(w))
            r.setHeight(rdouble(h))
            r.setTextValue(rstring(cls))
            r.setTheZ(rint(0))
            r.setTheT(rint(0))
            roi = omero.model.RoiI()
            roi.setImage(omero.model.ImageI(iid, False))
            roi.addShape(r)
            rois.append(roi)
        conn.getUpdateService().saveAndReturnArray(rois, conn.SERVICE_OPTS)
        info = {"dataset": ds_id, "image": iid, "pixels": base}
        try:
            yield info
        finally:
            ids = [int(i.getId()) for i in conn.getObjects("Image", opts={"dataset": ds_id})]
            if ids:
                conn.deleteObjects("Image", ids, deleteAnns=True, deleteChildren=True, wait=True)
            conn.deleteObjects("Dataset", [ds_id], deleteAnns=True, deleteChildren=False, wait=True)


def test_live_read_metadata_pixels_and_rois(live_settings, live) -> None:
    with OmeroSession(live_settings) as s, OmeroImageHandle(s, live["image"]) as h:
        assert (h.levels[0].width, h.levels[0].height) == (600, 500)
        assert h.mpp == pytest.approx((0.5, 0.5))
        np.testing.assert_array_equal(h.read_region(0, 100, 50, 200, 150), live["pixels"][50:200, 100:300])
        classes = sorted(a.class_name for a in h.annotations())
        assert classes == ["Stroma", "Tumor"]


def test_live_enhance_rois_writes_results_and_is_idempotent(live_settings, live) -> None:
    with OmeroSession(live_settings) as s:
        run = enhance_omero(s, prompt="sr x2", image_ids=[live["image"]], roi_classes=["Tumor"],
                            options=EngineOptions(engine="classical"))
        assert [o.status for o in run] == ["done"], run
        (new_id,) = new_image_ids(run)
        image = s.conn.getObject("Image", new_id)
        assert (image.getSizeX(), image.getSizeY(), image.getSizeC()) == (200, 160, 3)
        assert image.getPixelSizeX() == pytest.approx(0.25)
        assert live["dataset"] in [p.getId() for p in image.listParents()]
        maps = [a for a in image.listAnnotations(ns=NAMESPACE) if a.OMERO_TYPE == omero.model.MapAnnotationI]
        pairs = dict(maps[0].getValue())
        assert pairs["lpfm.state"] == "complete" and pairs["lpfm.source.id"] == str(live["image"])
        files = [a for a in image.listAnnotations(ns=NAMESPACE) if a.OMERO_TYPE == omero.model.FileAnnotationI]
        prov = Provenance.from_json(b"".join(files[0].getFileInChunks()).decode())
        assert prov.output["image_id"] == new_id
        result = s.conn.getRoiService().findByImage(new_id, None, s.conn.SERVICE_OPTS)
        rect = result.rois[0].copyShapes()[0]
        assert [unwrap(v) for v in (rect.getX(), rect.getY(), rect.getWidth(), rect.getHeight())] == [0, 0, 200, 160]
        plane = image.getPrimaryPixels().getPlane(0, 0, 0)
        assert plane.shape == (160, 200)

        again = enhance_omero(s, prompt="sr x2", image_ids=[live["image"]], roi_classes=["Tumor"],
                              options=EngineOptions(engine="classical"))
        assert [o.status for o in again] == ["skipped"] and new_image_ids(again) == []


def test_live_channels_mode(live_settings, live) -> None:
    with OmeroSession(live_settings) as s:
        run = enhance_omero(s, prompt="denoise", image_ids=[live["image"]], roi_classes=["Stroma"],
                            options=EngineOptions(engine="classical"), output="channels")
        (new_id,) = new_image_ids(run)
        image = s.conn.getObject("Image", new_id)
        assert image.getSizeC() == 6
        original = image.getPrimaryPixels().getPlane(0, 0, 0)
        np.testing.assert_array_equal(original, live["pixels"][200:290, 300:420, 0])
