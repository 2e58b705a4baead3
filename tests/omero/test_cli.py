"""End to end against the fake server: ``lpfm omero info`` and ``lpfm omero enhance`` on the bundled sample slide."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)")

import omero.model  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from omero.rtypes import rdouble, rstring, unwrap  # noqa: E402

from lpfm_toolkit.cli.main import cli  # noqa: E402

LOGIN = ["omero", "--host", "omero.example.org", "--user", "alice"]
ENV = {"OMERO_PASSWORD": "s3cret", "COLUMNS": "200"}
TUMOUR_BOXES = [(900, 1200, 256, 192), (1400, 1500, 250, 200)]


@pytest.fixture
def cmu(server, sample_pyramid, make_pyramid, make_rect):
    """The sample slide as an OMERO image in a dataset, with ROIs of two classes (Tumor, Stroma)."""
    ds = server.add_dataset("CMU")
    iid = server.add_image("CMU-1-Small-Region.svs", make_pyramid(sample_pyramid[0], 3), dataset=ds,
                           rgb_colours=True, mpp=0.499)
    server.add_roi(iid, make_rect(*TUMOUR_BOXES[0], "Tumor"), name="T1")
    poly = omero.model.PolygonI()
    x, y, w, h = TUMOUR_BOXES[1]
    poly.setPoints(rstring(f"{x},{y} {x + w},{y} {x + w},{y + h} {x},{y + h // 2}"))
    poly.setTextValue(rstring("Tumor"))
    server.add_roi(iid, poly, name="T2")
    ell = omero.model.EllipseI()
    for k, v in (("X", 400.0), ("Y", 400.0), ("RadiusX", 60.0), ("RadiusY", 40.0)):
        getattr(ell, f"set{k}")(rdouble(v))
    ell.setTextValue(rstring("Stroma"))
    server.add_roi(iid, ell, name="S1")
    return iid, ds


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, LOGIN + args, env=ENV, catch_exceptions=False)


def test_info_shows_levels_channels_and_roi_classes(server, cmu) -> None:
    iid, _ = cmu
    res = _invoke(["info", str(iid)])
    assert res.exit_code == 0, res.output
    assert "2220" in res.output and "2967" in res.output and "0.499" in res.output
    assert "R, G, B" in res.output and "Stroma (1)" in res.output and "Tumor (2)" in res.output


def test_enhance_roi_class_makes_one_image_per_roi_and_a_rerun_makes_none(server, cmu) -> None:
    iid, ds = cmu
    original = server.snapshot()
    args = ["enhance", "--image", str(iid), "--roi-class", "Tumor", "--engine", "classical", "--prompt", "sr x2"]
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    new = [i for i in server.images if i not in original]
    assert len(new) == 2
    for image_id in new:
        assert re.search(rf"\b{image_id}\b", res.output)  # the summary table names the new images
    by_roi = {}
    for image_id in new:
        pairs = server.map_of(image_id)
        assert pairs["lpfm.state"] == "complete" and pairs["lpfm.engine"] == "classical"
        assert pairs["lpfm.source.id"] == str(iid) and pairs["lpfm.prompt"] == "sr x2"
        assert pairs["lpfm.source.annotation"].startswith("Tumor: T")
        region = tuple(int(v) for v in pairs["lpfm.source.region"].split(","))
        by_roi[region] = image_id
        assert server.pixels_of(image_id).shape == (region[3] * 2, region[2] * 2, 3)
        assert image_id in server.images_in(ds)
        assert server.images[image_id].obj.getPrimaryPixels().getPhysicalSizeX().getValue() == \
            pytest.approx(0.499 / 2)
    assert set(by_roi) == set(TUMOUR_BOXES)
    # the ROI itself comes along, in the new image's pixels (moved to the origin, doubled)
    shapes = [s for r in server.images[by_roi[TUMOUR_BOXES[0]]].rois for s in r.copyShapes()]
    rect = next(s for s in shapes if isinstance(s, omero.model.RectangleI))
    assert [unwrap(v) for v in (rect.getX(), rect.getY(), rect.getWidth(), rect.getHeight())] == [0, 0, 512, 384]
    # the enhanced pixels resemble the original (classical bicubic-type up-sampling, not noise)
    out = server.pixels_of(by_roi[TUMOUR_BOXES[0]]).astype(float)
    x, y, w, h = TUMOUR_BOXES[0]
    src = server.pixels_of(iid)[y : y + h, x : x + w].astype(float)
    assert abs(out[::2, ::2].mean() - src.mean()) < 3 and np.corrcoef(out[::2, ::2].ravel(), src.ravel())[0, 1] > 0.9

    again = _invoke(args)
    assert again.exit_code == 0, again.output
    assert [i for i in server.images if i not in original] == new  # nothing new
    assert again.output.count("│ skipped │") == 2 and "2 skipped" in again.output
    assert {i: b for i, b in server.snapshot().items() if i in original} == original


def test_enhance_dataset_in_channels_mode(server, cmu) -> None:
    iid, ds = cmu
    before = set(server.images)
    res = _invoke(["enhance", "--dataset", str(ds), "--roi-class", "stroma", "--engine", "classical",
                   "--prompt", "denoise", "--output", "channels"])
    assert res.exit_code == 0, res.output
    (new,) = set(server.images) - before
    px = server.pixels_of(new)
    assert px.shape == (80, 120, 6)
    np.testing.assert_array_equal(px[:, :, :3], server.pixels_of(iid)[360:440, 340:460])
    assert server.map_of(new)["lpfm.mode"] == "channels"


def test_a_failing_item_is_reported_and_the_exit_code_says_so(server, cmu) -> None:
    iid, _ = cmu
    server.read_only_groups.add(3)
    res = _invoke(["enhance", "--image", str(iid), "--roi-class", "Tumor", "--engine", "classical",
                   "--prompt", "sr x2"])
    assert res.exit_code == 1
    assert res.output.count("failed") >= 2 and "OMERO refused to write" in res.output


def test_missing_credentials_and_selection_are_clear_errors(server, cmu) -> None:
    res = CliRunner().invoke(cli, ["omero", "--host", "h", "info", "1"], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "no OMERO credentials" in res.output
    res = _invoke(["enhance", "--prompt", "sr x2", "--engine", "classical"])
    assert res.exit_code == 2 and "nothing selected" in res.output


def test_connector_imports_neither_torch_nor_the_engine() -> None:
    code = ("import sys; import lpfm_toolkit.integrations.omero.session, lpfm_toolkit.integrations.omero.source, "
            "lpfm_toolkit.integrations.omero.sink, lpfm_toolkit.integrations.omero.workflow, "
            "lpfm_toolkit.cli.omero; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('lpfm_toolkit.engine')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_with_a_session_key_from_the_environment_detaches(server, cmu) -> None:
    iid, _ = cmu
    res = CliRunner().invoke(cli, ["omero", "--host", "h", "--group", "other-lab", "info", str(iid), "--json"],
                             env={"OMERO_SESSION_KEY": "session-key-1", "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert '"image_id": ' + str(iid) in res.output and '"Tumor": 2' in res.output
    gw = server.gateways[0]
    gw.conn.connect.assert_called_once_with(sUuid="session-key-1")
    assert gw.closed is False  # detached, not killed


def test_a_session_key_as_a_flag_value_is_refused_and_read_from_stdin_or_a_file(server, cmu, tmp_path) -> None:
    iid, _ = cmu
    res = CliRunner().invoke(cli, ["omero", "--host", "h", "--session-key", "session-key-1", "info", str(iid)],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "process list" in res.output and "OMERO_SESSION_KEY" in res.output
    assert "session-key-1" not in res.output and not server.gateways  # refused before any connection
    res = CliRunner().invoke(cli, ["omero", "--host", "h", "--session-key", "-", "info", str(iid), "--json"],
                             input="session-key-1\n", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    server.gateways[-1].conn.connect.assert_called_once_with(sUuid="session-key-1")
    key_file = tmp_path / "key"
    key_file.write_text("session-key-1\n")
    res = CliRunner().invoke(cli, ["omero", "--host", "h", "--session-key-file", str(key_file), "info", str(iid)],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["omero", "--host", "h", "info", str(iid)],
                             env={"LPFM_OMERO_SESSION_KEY": "session-key-1", "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    server.gateways[-1].conn.connect.assert_called_once_with(sUuid="session-key-1")
