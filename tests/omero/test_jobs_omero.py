"""Scheduled OMERO enhancement through the job store, on the autospecced fake server (Python 3.10 suite).

Images tagged ``lpfm:<prompt>`` (or with the pair ``lpfm.enhance = <prompt>``) are queued once, run through the
same runner as every job, written back as new OMERO images with provenance, and their originals marked
``lpfm:done`` / ``lpfm:failed`` without a pixel changed; lost sessions and refused writes included.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip(
    "omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)"
)

import Ice  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from lpfm_toolkit.cli.main import cli  # noqa: E402
from lpfm_toolkit.integrations.omero import jobsource  # noqa: E402
from lpfm_toolkit.integrations.omero.jobsource import (  # noqa: E402
    DONE_TAG,
    FAILED_TAG,
    find_requests,
    omero_specs,
    queue,
    session_for,
    state_of,
    watch_omero,
)
from lpfm_toolkit.integrations.omero.session import OmeroSettings  # noqa: E402
from lpfm_toolkit.jobs import DONE, FAILED, QUEUED, JobSpec, JobStore, LocalRunner, run_queued  # noqa: E402

TEMPLATE = JobSpec(source="", prompt="", out="", engine="identity", tile=64, overlap=8)
ENV = {"OMERO_HOST": "omero.example.org", "OMERO_USER": "alice", "OMERO_PASSWORD": "s3cret", "COLUMNS": "250"}


@pytest.fixture(autouse=True)
def fresh_sessions(monkeypatch: pytest.MonkeyPatch):
    """Credentials in the environment only, and no session kept from another test's fake server."""
    jobsource.close_sessions()
    yield
    jobsource.close_sessions()


@pytest.fixture
def lab(server, make_pyramid, make_rect, monkeypatch):
    """Three images in a dataset of a project: A tagged ``lpfm:sr x2``, B with ``lpfm.enhance = denoise``, C not."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    rng = np.random.default_rng(5)
    ds = server.add_dataset("incoming")
    ids = [
        server.add_image(
            f"{n}.svs",
            make_pyramid(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), 2),
            dataset=ds,
            rgb_colours=True,
        )
        for n in "ABC"
    ]
    server.add_roi(ids[2], make_rect(8, 8, 20, 16, "Tumor"), name="t1")
    server.add_roi(ids[2], make_rect(60, 40, 24, 20, "Tumor"), name="t2")
    server.tag_image(ids[0], "lpfm:sr x2")
    server.add_pairs(ids[1], {"lpfm.enhance": "denoise", "stain": "H&E"})
    project = server.add_project("study", [ds])
    return ids, ds, project


def settings() -> OmeroSettings:
    return OmeroSettings.resolve()


def results_of(server, before) -> list[int]:
    return sorted(i for i in server.images if i not in before)


def test_tagged_images_are_queued_once_run_written_back_and_marked_done(server, lab, tmp_path) -> None:
    (a, b, c), _, _ = lab
    originals = server.snapshot()
    with JobStore(tmp_path / "jobs.sqlite") as store:
        first = watch_omero(store, TEMPLATE, settings())
        assert len(first.added) == 2 and not first.rejected
        again = watch_omero(store, TEMPLATE, settings())
        assert again.added == [] and sorted(again.existing) == sorted(first.added)  # idempotent by key
        specs = {j.spec["entry"]: j.spec for j in store.jobs()}
        assert specs[str(a)]["prompt"] == "sr x2" and specs[str(b)]["prompt"] == "denoise"
        summary = run_queued(store, LocalRunner(1))
        assert summary.done == 2 and summary.failed == 0
        jobs = {j.spec["entry"]: j for j in store.jobs(DONE)}
        new = results_of(server, originals)
        assert len(new) == 2
        for iid in new:  # results as `lpfm omero enhance` makes them: key, state, provenance file
            assert server.map_of(iid)["lpfm.state"] == "complete"
            assert server.map_of(iid)["lpfm.idempotency_key"] in {j.key for j in jobs.values()}
        assert {j.result_uri for j in jobs.values()} == {f"omero://omero.example.org/image/{i}" for i in new}
        assert DONE_TAG in server.tags_of(a) and DONE_TAG in server.tags_of(b)
        s = session_for("omero://omero.example.org:4064")
        assert state_of(s, a)["sr x2"]["lpfm.state"] == "done"
        assert state_of(s, b)["denoise"]["lpfm.results"].startswith("omero://")
        assert server.tags_of(c) == []
        assert {i: server.snapshot()[i] for i in originals} == originals  # no original pixel or ROI touched
        # the next look finds the requests handled: nothing is opened, nothing queued
        assert find_requests(s) == []
        assert watch_omero(store, TEMPLATE, settings()).added == []
        assert run_queued(store, LocalRunner(1)).finished == 0
    assert len(results_of(server, originals)) == 2


def test_requests_are_found_in_every_group_whatever_the_last_job_switched_to(server, lab, make_pyramid) -> None:
    (a, b, _), _, _ = lab
    theirs = server.add_image("D.svs", make_pyramid(np.zeros((64, 64, 3), np.uint8), 1), group=5)
    server.tag_image(theirs, "lpfm:denoise")
    s = session_for("omero://omero.example.org:4064")
    s.switch_group(3)  # as an earlier job in the image's group left it
    found = {(r.image_id, r.prompt, r.how) for r in find_requests(s)}
    assert found == {(a, "sr x2", "tag"), (b, "denoise", "key-value"), (theirs, "denoise", "tag")}


def test_images_datasets_projects_and_roi_classes(server, lab, tmp_path) -> None:
    (a, b, c), ds, project = lab
    s = session_for("omero://omero.example.org:4064")
    ids = jobsource.image_ids_of(s, images=[c], datasets=[ds], projects=[project])
    assert ids == [c, a, b]
    template = dataclasses.replace(TEMPLATE, roi_classes=("tumor",))
    specs = omero_specs(s, template, image_ids=[c], prompt="sr x2")
    before = dict(server.images)
    with JobStore(tmp_path / "jobs.sqlite") as store:
        assert len(queue(store, specs).added) == 1
        assert run_queued(store, LocalRunner(1)).done == 1
        (job,) = store.jobs(DONE)
    new = results_of(server, before)
    assert len(new) == 2 and len(job.result_uri.split()) == 2  # one new image per Tumor ROI
    assert state_of(s, c)["sr x2"]["lpfm.state"] == "done"


def test_session_lost_mid_run_and_dropped_between_jobs_are_reestablished(server, lab, tmp_path) -> None:
    (a, b, _), _, _ = lab
    server.inject("getTile", Ice.ConnectionLostException(), after=1)  # mid-read of the first job
    with JobStore(tmp_path / "jobs.sqlite") as store:
        watch_omero(store, TEMPLATE, settings())
        n_gateways = len(server.gateways)
        (first,) = [k for k in store.jobs() if k.spec["entry"] == str(a)]
        assert run_queued(store, LocalRunner(1), limit=1).done == 1
        assert len(server.gateways) == n_gateways + 1  # one reconnect
        for gw in server.gateways:  # the server drops every session between two jobs
            gw.alive = False
        assert run_queued(store, LocalRunner(1)).done == 1
        assert len(server.gateways) == n_gateways + 2  # a new session, not a failure
        assert store.counts()[DONE] == 2
    assert DONE_TAG in server.tags_of(a) and DONE_TAG in server.tags_of(b)


def test_permission_denied_fails_the_job_and_marks_the_original_failed_with_the_reason(server, lab, tmp_path) -> None:
    (a, _, _), _, _ = lab
    theirs = server.add_dataset("another group's", group=5)  # OMERO does not link across groups
    template = dataclasses.replace(TEMPLATE, target_dataset=str(theirs))
    before = dict(server.images)
    with JobStore(tmp_path / "jobs.sqlite") as store:
        queue(
            store, omero_specs(session_for("omero://omero.example.org:4064"), template, image_ids=[a], prompt="sr x2")
        )
        summary = run_queued(store, LocalRunner(1), max_attempts=2)
        assert summary.failed == 1 and summary.retried == 1
        (job,) = store.jobs(FAILED)
        assert "does not link across groups" in job.last_error
    assert results_of(server, before) == []
    assert server.tags_of(a) == sorted(["lpfm:sr x2", FAILED_TAG])
    state = state_of(session_for("omero://omero.example.org:4064"), a)["sr x2"]
    assert state["lpfm.state"] == "failed" and "across groups" in state["lpfm.reason"]

    # retried after the cause was fixed: done, and the stale lpfm:failed tag is taken off (the tag stays defined)
    with JobStore(tmp_path / "jobs.sqlite") as store:
        store.retry()
        spec = dataclasses.replace(JobSpec.from_dict(store.jobs()[0].spec), target_dataset=None)
        store._db.execute("UPDATE jobs SET spec = ?", (__import__("json").dumps(spec.to_dict()),))
        assert run_queued(store, LocalRunner(1)).done == 1
    assert server.tags_of(a) == sorted(["lpfm:sr x2", DONE_TAG])


def test_a_read_only_group_fails_cleanly_without_a_traceback(server, lab, tmp_path) -> None:
    (a, _, _), _, _ = lab
    server.read_only_groups.add(3)
    before = dict(server.images)
    with JobStore(tmp_path / "jobs.sqlite") as store:
        queue(
            store, omero_specs(session_for("omero://omero.example.org:4064"), TEMPLATE, image_ids=[a], prompt="sr x2")
        )
        summary = run_queued(store, LocalRunner(1), max_attempts=1)
        assert summary.failed == 1
        (job,) = store.jobs(FAILED)
        assert "OMERO refused" in job.last_error and "\n" not in job.last_error
    assert results_of(server, before) == [] and server.tags_of(a) == ["lpfm:sr x2"]  # marking was refused too


def test_cli_watch_omero_once_then_nothing_new(server, lab, tmp_path) -> None:
    (a, b, _), _, _ = lab
    store = str(tmp_path / "jobs.sqlite")
    args = [
        "jobs",
        "watch",
        "--omero",
        "--once",
        "--engine",
        "identity",
        "--tile",
        "64",
        "--overlap",
        "8",
        "--store",
        store,
    ]
    res = CliRunner().invoke(cli, args, env=ENV)
    assert res.exit_code == 0, res.output
    assert "added 2 job(s)" in res.output and "2 done" in res.output
    res = CliRunner().invoke(cli, args, env=ENV)
    assert res.exit_code == 0 and "added 0 job(s)" in res.output and "done:" not in res.output, res.output
    assert DONE_TAG in server.tags_of(a) and DONE_TAG in server.tags_of(b)


def test_cli_add_omero(server, lab, tmp_path) -> None:
    (a, b, c), ds, project = lab
    store = str(tmp_path / "jobs.sqlite")
    base = ["jobs", "add-omero", "--engine", "identity", "--store", store]
    res = CliRunner().invoke(cli, [*base, "--project", str(project), "-p", "denoise", "--tagged"], env=ENV)
    # 3 × denoise, and A's sr x2 (B's request, denoise, is the same work as the project's: one job)
    assert res.exit_code == 0 and "added 4 job(s)" in res.output, res.output
    res = CliRunner().invoke(cli, [*base, "--dataset", str(ds), "-p", "denoise"], env=ENV)
    assert "added 0 job(s), 3 already" in res.output
    res = CliRunner().invoke(cli, [*base, "--image", str(a)], env=ENV)
    assert res.exit_code == 2 and "need --prompt" in res.output
    res = CliRunner().invoke(cli, base, env=ENV)
    assert res.exit_code == 2 and "nothing selected" in res.output
    res = CliRunner().invoke(cli, [*base, "--tagged"], env={**ENV, "OMERO_PASSWORD": ""})
    assert res.exit_code == 2 and "no OMERO credentials" in res.output and "Traceback" not in res.output
    with JobStore(store) as s:
        assert s.counts()[QUEUED] == 4
