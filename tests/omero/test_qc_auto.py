"""``lpfm omero enhance --auto`` against the autospec'd fake server (real omero-py, Python 3.10, classical engine)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = [pytest.mark.omero, pytest.mark.qc]

pytest.importorskip(
    "omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)"
)

LOGIN = ["omero", "--host", "omero.example.org", "--user", "alice"]
ENV = {"OMERO_PASSWORD": "s3cret", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def noisy_tissue(sample_pyramid: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """512² of the sample's held-out tissue (clean) and the same with noise σ 30 in its left half."""
    from lpfm_toolkit.engine.estimate_synthetic import degrade_region, tissue_mosaic

    base = sample_pyramid[0]
    clean = tissue_mosaic(base[int(base.shape[0] * 0.8) :], 512, 512, seed=4, min_tissue=0.6)
    img = clean.copy()
    img[:, :256] = degrade_region(clean, (0, 0, 256, 512), 0.0, 30.0, 0, np.random.default_rng(0))
    return clean, img


def test_auto_enhances_only_flagged_tiles_into_a_new_image_and_a_rerun_skips(
    server: Any, settings: Any, noisy_tissue: tuple[np.ndarray, np.ndarray], make_pyramid: Any
) -> None:
    from lpfm_toolkit.batch import Status
    from lpfm_toolkit.integrations.omero.qc import auto_enhance_omero
    from lpfm_toolkit.integrations.omero.session import OmeroSession
    from lpfm_toolkit.options import EngineOptions

    clean, img = noisy_tissue
    ds = server.add_dataset("auto")
    iid = server.add_image("noisy.svs", make_pyramid(img, 2), dataset=ds, rgb_colours=True, mpp=0.5)
    glass = server.add_image("glass.svs", [np.full((256, 256, 3), 243, np.uint8)], dataset=ds, rgb_colours=True)
    original = server.snapshot()
    options = EngineOptions(engine="classical")
    with OmeroSession(settings) as s:
        run = auto_enhance_omero(s, options, dataset_id=ds)
    by_image = {o.detail["image_id"]: o for o in run}
    done = by_image[iid]
    assert done.status is Status.DONE, done.error
    assert by_image[glass].status is Status.NOTHING and by_image[glass].detail["qc"]["flagged_tiles"] == 0
    new = done.detail["new_image_id"]
    assert new in server.images_in(ds) and set(done.detail["qc"]["tasks"]) == {"denoise"}
    pairs = server.map_of(new)
    assert pairs["lpfm.state"] == "complete" and pairs["lpfm.engine"] == "auto" and pairs["lpfm.source.id"] == str(iid)
    out = server.pixels_of(new)
    right = (slice(0, 512), slice(320, 512))  # the clean half, away from the noisy one: the input's pixels
    assert np.array_equal(out[right], img[right])
    inner = (slice(16, 496), slice(16, 240))

    def err(a: np.ndarray) -> float:
        return float(np.std(a[inner].astype(float) - clean[inner]))

    assert err(out) < 0.6 * err(img)
    assert {i: b for i, b in server.snapshot().items() if i in original} == original  # nothing of theirs changed
    with OmeroSession(settings) as s:
        again = auto_enhance_omero(s, options, image_ids=[iid])
    assert [o.status for o in again] == [Status.SKIPPED]
    assert [i for i in server.images if i not in original] == [new]


def test_cli_omero_enhance_auto(server: Any, noisy_tissue: tuple[np.ndarray, np.ndarray], make_pyramid: Any) -> None:
    from lpfm_toolkit.cli.main import cli

    _, img = noisy_tissue
    iid = server.add_image("noisy.svs", make_pyramid(img, 2), dataset=server.add_dataset("a"), rgb_colours=True)
    args = [*LOGIN, "enhance", "--image", str(iid), "--auto", "--engine", "classical"]
    res = CliRunner().invoke(cli, args, env=ENV)
    assert res.exit_code == 0, res.output
    assert "1 done" in res.output and "denoise" in res.output  # summary and the before/after table
    for bad, message in ((["--auto", "-p", "denoise"], "not both"), ([], "no prompt given")):
        res = CliRunner().invoke(cli, [*LOGIN, "enhance", "--image", str(iid), *bad], env=ENV)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_the_omero_script_runs_auto(
    server: Any, settings: Any, noisy_tissue: tuple[np.ndarray, np.ndarray], make_pyramid: Any
) -> None:
    """Prompt "auto" in the LPFM_Enhance OMERO.script runs --auto."""
    import importlib.util
    from importlib import resources

    path = resources.files("lpfm_toolkit.integrations.omero") / "scripts" / "LPFM_Enhance.py"
    spec = importlib.util.spec_from_file_location("LPFM_Enhance_auto", str(path))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, img = noisy_tissue
    iid = server.add_image("noisy.svs", make_pyramid(img, 2), dataset=server.add_dataset("s"), rgb_colours=True)
    conn = server.make_gateway(settings)
    conn.connect()
    params = {"Data_Type": "Image", "IDs": [iid], "Prompt": "auto", "Model": "classical", "Output_Mode": "new"}
    message, new_ids, outcomes = script.run(conn, params)
    assert message == "lpfm: 1 done" and len(new_ids) == 1, message
    assert server.map_of(new_ids[0])["lpfm.engine"] == "auto" and outcomes[0].detail["qc"]["flagged_tiles"] > 0


def test_an_image_tagged_lpfm_auto_is_an_auto_job(
    server: Any,
    noisy_tissue: tuple[np.ndarray, np.ndarray],
    make_pyramid: Any,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tag ``lpfm:auto`` in OMERO.web → an --auto job with its own key; run, written back, original marked done."""
    from lpfm_toolkit.integrations.omero import jobsource
    from lpfm_toolkit.integrations.omero.session import OmeroSettings
    from lpfm_toolkit.jobs import DONE, JobSpec, JobStore, LocalRunner, run_queued

    for k, v in {"OMERO_HOST": "omero.example.org", "OMERO_USER": "alice", "OMERO_PASSWORD": "s3cret"}.items():
        monkeypatch.setenv(k, v)
    jobsource.close_sessions()
    _, img = noisy_tissue
    iid = server.add_image("noisy.svs", make_pyramid(img, 2), dataset=server.add_dataset("in"), rgb_colours=True)
    server.tag_image(iid, "lpfm:auto")
    before = set(server.images)
    template = JobSpec(source="", prompt="", out="", engine="classical")
    try:
        with JobStore(tmp_path / "jobs.sqlite") as store:
            added = jobsource.watch_omero(store, template, OmeroSettings.resolve())
            assert len(added.added) == 1 and added.added[0].startswith("auto-"), added.rejected
            summary = run_queued(store, LocalRunner(1))
            assert summary.done == 1 and summary.failed == 0
            (job,) = store.jobs(DONE)
        (new,) = [i for i in server.images if i not in before]
        assert server.map_of(new)["lpfm.engine"] == "auto" and job.result_uri.endswith(f"/image/{new}")
        assert jobsource.DONE_TAG in server.tags_of(iid)
    finally:
        jobsource.close_sessions()
