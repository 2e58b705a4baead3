"""``lpfm reproduce`` of OMERO results (fake server): re-run from the image's provenance, compare pixels; and a
ROI-class run opens each image once."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip(
    "omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)"
)

import omero.model  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from lpfm_toolkit.cli.main import cli  # noqa: E402

HOST = "omero.example.org"
LOGIN = ["omero", "--host", HOST, "--user", "alice"]
ENV = {"OMERO_PASSWORD": "s3cret", "COLUMNS": "200"}


@pytest.fixture
def original(server, make_pyramid, make_rect):
    """A small textured RGB image in a dataset, with two Tumor ROIs and one Stroma ROI."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (200, 264, 3), dtype=np.uint8)
    ds = server.add_dataset("repro")
    iid = server.add_image("slide.svs", make_pyramid(base, 2), dataset=ds, rgb_colours=True, mpp=0.5)
    server.add_roi(iid, make_rect(10, 20, 60, 50, "Tumor"), name="T1")
    server.add_roi(iid, make_rect(120, 90, 70, 64, "Tumor"), name="T2")
    server.add_roi(iid, make_rect(150, 10, 40, 30, "Stroma"), name="S1")
    return iid


def _omero(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, [*LOGIN, *args], env={**ENV, **(env or {})})


def _enhance(server, iid: int, *extra: str) -> list[int]:
    before = set(server.images)
    res = _omero("enhance", "--image", str(iid), "--engine", "classical", *extra)
    assert res.exit_code == 0, res.output
    return sorted(set(server.images) - before)


def _one_line_error(res, text: str) -> None:
    assert res.exit_code == 2, res.output
    assert text in res.output and "Traceback" not in res.output, res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("error")]) == 1, res.output


def test_an_omero_result_is_reproduced_by_id_and_by_uri_without_writing(server, original) -> None:
    (new,) = _enhance(server, original, "--prompt", "sr x2")
    before, images = server.snapshot(), set(server.images)
    res = _omero("reproduce", str(new))
    assert res.exit_code == 0, res.output
    assert "identical pixels" in res.output and "damaged" not in res.output
    recorded = server.map_of(new)["lpfm.output.sha256"]
    assert f"recorded output sha256 {recorded}" in res.output and f"reproduced          {recorded}" in res.output
    # `lpfm reproduce` takes the URI provenance records; credentials come from the environment only
    uri = f"omero://{HOST}/image/{new}"
    res = CliRunner().invoke(cli, ["reproduce", uri], env={"OMERO_USER": "alice", **ENV})
    assert res.exit_code == 0 and "identical pixels" in res.output, res.output
    res = CliRunner().invoke(cli, ["omero", "--user", "alice", "reproduce", uri], env=ENV)  # host from the URI
    assert res.exit_code == 0 and "identical pixels" in res.output, res.output
    assert server.snapshot() == before and set(server.images) == images  # nothing written, nothing new


def test_the_library_dispatches_an_omero_uri_to_the_connector(server, settings, original) -> None:
    from lpfm_toolkit.integrations.omero.session import OmeroSession
    from lpfm_toolkit.verify import reproduce

    (new,) = _enhance(server, original, "--prompt", "denoise")
    with OmeroSession(settings) as session:
        rep = reproduce(f"omero://{HOST}/image/{new}", session=session)
    assert rep.identical and rep.kind == "image" and rep.output == f"omero://{HOST}/image/{new}"
    assert rep.reproduced_sha256 == server.map_of(new)["lpfm.output.sha256"] and not rep.notes


def test_pixels_changed_on_the_server_or_in_the_source_are_reported_with_exit_1(server, original) -> None:
    (new,) = _enhance(server, original, "--prompt", "sr x2")
    server.images[new].levels[0][5, 7, 1] ^= 0x10  # someone changed the result's pixels
    res = _omero("reproduce", str(new))
    assert res.exit_code == 1, res.output
    assert "image damaged: its pixels on the server differ from the recorded output sha256" in res.output
    server.images[new].levels[0][5, 7, 1] ^= 0x10
    assert _omero("reproduce", str(new)).exit_code == 0
    server.images[original].levels[0][40:44, 30:34] //= 2  # the source changed in place: the re-run differs
    res = _omero("reproduce", str(new))
    assert res.exit_code == 1 and "pixels DIFFER" in res.output and "damaged" not in res.output, res.output


def test_roi_and_channels_results_are_reproduced(server, original, monkeypatch) -> None:
    from lpfm_toolkit.integrations.omero import reproduce as reproduce_mod

    server.max_plane = (64, 64)  # results uploaded tile by tile, read back in 64-px requests
    monkeypatch.setattr(reproduce_mod, "_BAND_BYTES", 8192)  # and checked in bands of a few rows
    tumours = _enhance(server, original, "--roi-class", "Tumor", "--prompt", "sr x2")
    (channels,) = _enhance(server, original, "--roi-class", "Stroma", "--prompt", "sr x2", "--output", "channels")
    assert len(tumours) == 2 and server.pixels_of(channels).shape[2] == 6
    assert all(server.images[i].write_log for i in (*tumours, channels))  # the tiled upload path
    for image_id in (*tumours, channels):
        res = _omero("reproduce", str(image_id))
        assert res.exit_code == 0 and "identical pixels" in res.output, res.output
    server.images[channels].levels[0][3, 3, 4] ^= 1  # an enhanced channel
    res = _omero("reproduce", str(channels))
    assert res.exit_code == 1 and "differ from the recorded output sha256" in res.output, res.output
    assert "original channels" not in res.output
    server.images[channels].levels[0][3, 3, 4] ^= 1
    for y, x in ((4, 4), (3, 5)):  # an original channel beside it (each pixel of a replicated block is checked)
        server.images[channels].levels[0][y, x, 0] ^= 1
        res = _omero("reproduce", str(channels))
        assert res.exit_code == 1 and "image damaged: its original channels differ" in res.output, res.output
        assert "output sha256 (changed" not in res.output
        server.images[channels].levels[0][y, x, 0] ^= 1


def test_an_auto_result_is_reproduced_from_its_recorded_plan(server, sample_pyramid, make_pyramid) -> None:
    """`lpfm omero enhance --auto` results record their QC plan; reproduce re-runs that plan."""
    img = sample_pyramid[0][1200:1456, 900:1284].astype(np.float32)  # tissue of the bundled sample slide
    img[:, :192] += np.random.default_rng(0).normal(0, 30, img[:, :192].shape)  # its left half noisy
    iid = server.add_image("noisy.svs", make_pyramid(np.clip(img + 0.5, 0, 255).astype(np.uint8), 2), rgb_colours=True)
    (new,) = _enhance(server, iid, "--auto")
    assert server.map_of(new)["lpfm.engine"] == "auto"
    res = _omero("reproduce", str(new))
    assert res.exit_code == 0 and "identical pixels" in res.output, res.output


def test_missing_or_damaged_provenance_is_one_clear_line(server, original) -> None:
    _one_line_error(_omero("reproduce", str(original)), f"OMERO image {original} carries no lpfm provenance")
    _one_line_error(_omero("reproduce", "999999"), "does not exist or you cannot see it")
    _one_line_error(_omero("reproduce", "omero:/x"), "is not an OMERO image")
    (new,) = _enhance(server, original, "--prompt", "sr x2")
    # the key-value annotation edited in OMERO.web: it no longer agrees with the provenance file
    ann = next(a for a in server.annotations_of(new) if isinstance(a, omero.model.MapAnnotationI))
    pairs = [(nv.name, nv.value) for nv in ann.getMapValue()]
    ann.setMapValue([omero.model.NamedValue(k, "7" if k == "lpfm.seed" else v) for k, v in pairs])
    _one_line_error(_omero("reproduce", str(new)), "disagree on lpfm.seed")
    ann.setMapValue([omero.model.NamedValue(k, v) for k, v in pairs])
    # the provenance file removed: the key-value pairs alone cannot say how to re-run it
    server.image_ann_links = [
        (i, a)
        for i, a in server.image_ann_links
        if not (i == new and isinstance(server.annotations[a], omero.model.FileAnnotationI))
    ]
    _one_line_error(_omero("reproduce", str(new)), "lost its provenance file")
    # an unfinished upload
    ann.setMapValue([omero.model.NamedValue(k, "writing" if k == "lpfm.state" else v) for k, v in pairs])
    _one_line_error(_omero("reproduce", str(new)), "unfinished lpfm upload")


def test_the_source_gone_and_no_credentials_are_clear_errors(server, original, monkeypatch) -> None:
    (new,) = _enhance(server, original, "--prompt", "sr x2")
    gateways = len(server.gateways)
    res = CliRunner().invoke(cli, ["reproduce", f"omero://{HOST}/image/{new}"], env={"COLUMNS": "200"})
    _one_line_error(res, "no OMERO credentials")
    assert "OMERO_SESSION_KEY" in res.output and len(server.gateways) == gateways  # refused before connecting
    res = CliRunner().invoke(
        cli, ["reproduce", f"omero://{HOST}/image/{new}"], env={"OMERO_SESSION_KEY": "session-key-1", "COLUMNS": "200"}
    )
    assert res.exit_code == 0 and "identical pixels" in res.output, res.output
    assert server.gateways[-1].closed is False  # a joined session is detached, never killed
    res = _omero("--host", "elsewhere.example.org", "reproduce", f"omero://{HOST}/image/{new}")
    _one_line_error(res, f"is on {HOST}, but the session is connected to elsewhere.example.org")
    del server.images[original]
    _one_line_error(_omero("reproduce", str(new)), f"the source of OMERO image {new}, image {original}, is gone")


def test_a_roi_class_run_opens_each_image_once(server, original, make_pyramid, make_rect) -> None:
    other = server.add_image("second.svs", make_pyramid(np.full((96, 128, 3), 90, np.uint8), 1), rgb_colours=True)
    server.add_roi(other, make_rect(8, 8, 40, 40, "Tumor"))
    server.calls.clear()
    res = _omero(
        "enhance",
        "--image",
        str(original),
        "--image",
        str(other),
        "--roi-class",
        "Tumor",
        "--engine",
        "classical",
        "--prompt",
        "sr x2",
    )
    assert res.exit_code == 0 and "3 done" in res.output, res.output
    # one pixel store per source image, however many of its ROIs run (was: one more to list the ROIs)
    assert server.calls.count("setPixelsId") == 2
    assert server.calls.count("findByImage") == 2  # the ROIs read once, also for copying them onto the results


def test_import_lpfm_and_verify_do_not_import_omero() -> None:
    code = (
        "import sys, lpfm_toolkit, lpfm_toolkit.verify, lpfm_toolkit.cli.local; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('omero', 'Ice') "
        "or m.startswith('lpfm_toolkit.integrations')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_dropped_connection_is_resumed_and_a_server_error_is_one_line(server, settings, original) -> None:
    import Ice

    from lpfm_toolkit.integrations.omero.session import OmeroSession
    from lpfm_toolkit.verify import reproduce

    (new,) = _enhance(server, original, "--prompt", "sr x2")
    server.inject("getTile", Ice.ConnectionLostException(), after=4)  # mid-way through the re-run's reads
    with OmeroSession(settings) as session:
        rep = reproduce(f"omero://{HOST}/image/{new}", session=session)
        assert session.reconnects == 1
    assert rep.identical
    server.inject("getAnnotationLinks", omero.InternalException(None, None, "database hiccup"))
    res = _omero("reproduce", str(new))
    _one_line_error(res, "OMERO failed while reproducing image")
    assert "InternalException: database hiccup" in res.output
