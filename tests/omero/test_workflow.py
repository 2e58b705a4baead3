"""enhance_omero: a batch keeps going past a failing item and records each outcome exactly."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)")

import omero  # noqa: E402

from lpfm_toolkit.batch import summary  # noqa: E402
from lpfm_toolkit.engine.base import IdentityEngine  # noqa: E402
from lpfm_toolkit.integrations.omero.session import OmeroSession, OmeroSettings  # noqa: E402
from lpfm_toolkit.integrations.omero.workflow import enhance_omero, new_image_ids  # noqa: E402


@pytest.fixture
def three(server, make_rect):
    ds = server.add_dataset("batch")
    ids = []
    for i in range(3):
        base = np.full((120, 160, 3), 40 * i, np.uint8)
        iid = server.add_image(f"s{i}.svs", [base], dataset=ds, rgb_colours=True)
        server.add_roi(iid, make_rect(10, 10, 40, 30, "Tumor"))
        ids.append(iid)
    return ds, ids


def test_a_server_error_on_one_image_does_not_stop_the_others(server, settings, three) -> None:
    ds, ids = three
    server.inject("findByImage", omero.InternalException(None, None, "database hiccup"), after=1)
    with OmeroSession(settings) as s:
        run = enhance_omero(s, prompt="sr x2", dataset_id=ds, roi_classes=["Tumor"], engine=IdentityEngine())
    assert [(o.detail["image_id"], o.status) for o in run] == [(ids[0], "done"), (ids[1], "failed"),
                                                               (ids[2], "done")]
    assert "InternalException: database hiccup" in run[1].error
    assert len(new_image_ids(run)) == 2 and summary(run) == "2 done, 1 failed"


def test_an_unrecoverable_session_loss_marks_the_rest_not_run(server, three) -> None:
    _, ids = three
    with OmeroSession(OmeroSettings(host="h", session_key="session-key-1")) as s:
        server.valid_session_keys.clear()  # expired: a reconnect cannot bring it back
        # the first image is read and written; the session expires as the second one is opened
        server.inject("setPixelsId", omero.SessionTimeoutException(None, None, "expired"), after=1)
        run = enhance_omero(s, prompt="sr x2", image_ids=ids, engine=IdentityEngine(), tile_size=64, overlap=8)
    assert [o.status for o in run] == ["done", "failed", "not run"]
    assert "reconnecting failed" in run[1].error
    assert run[2].error == "not run: the OMERO session was lost"


def test_no_images_is_a_clear_error(server, settings) -> None:
    ds = server.add_dataset("empty")
    with OmeroSession(settings) as s, pytest.raises(ValueError, match="no images to enhance"):
        enhance_omero(s, prompt="sr x2", dataset_id=ds, engine=IdentityEngine())


def test_a_dropped_connection_between_images_is_resumed(server, settings, three) -> None:
    _, ids = three
    server.inject("setPixelsId", omero.SessionTimeoutException(None, None, "expired"), after=1)
    with OmeroSession(settings) as s:
        run = enhance_omero(s, prompt="sr x2", image_ids=ids, engine=IdentityEngine(), tile_size=64, overlap=8)
        assert s.reconnects == 1
    assert [o.status for o in run] == ["done"] * 3
