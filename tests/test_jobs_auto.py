"""``lpfm jobs … --auto``: the spec carries it, its key is its own, and workers run QC-driven enhancement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.engine.estimate_synthetic import degrade_region, sample_tissue, tissue_mosaic
from lpfm_toolkit.jobs import DONE, JobSpec, JobStore

pytestmark = pytest.mark.qc


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512² of held-out real tissue whose left half has noise σ 30 (a tiled TIFF)."""
    import tifffile

    clean = tissue_mosaic(sample_tissue("holdout"), 512, 512, seed=4, min_tissue=0.6)
    img = clean.copy()
    img[:, :256] = degrade_region(clean, (0, 0, 256, 512), 0.0, 30.0, 0, np.random.default_rng(0))
    path = tmp_path_factory.mktemp("auto-jobs") / "noisy.tiff"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    return path


def _jobs(store: Path, *args: str) -> object:
    return CliRunner().invoke(cli, ["jobs", *args, "--store", str(store)])


def test_auto_jobs_have_their_own_key_and_run_like_other_jobs(noisy: Path, tmp_path: Path) -> None:
    store, out = tmp_path / "jobs.sqlite", tmp_path / "out"
    common = ["--engine", "classical", "--out", str(out)]
    res = _jobs(store, "add", str(noisy), "--auto", *common)
    assert res.exit_code == 0 and "added 1 job(s)" in res.output, res.output
    res = _jobs(store, "add", str(noisy), "-p", "auto", *common)  # -p auto is --auto: the same job
    assert "added 0 job(s), 1 already" in res.output, res.output
    res = _jobs(store, "add", str(noisy), "-p", "denoise", *common)  # the same image, one task everywhere
    assert "added 1 job(s)" in res.output, res.output
    with JobStore(store) as s:
        specs = {j.key: JobSpec.from_dict(j.spec) for j in s.jobs()}
    auto_keys = [k for k, sp in specs.items() if sp.auto]
    assert len(specs) == 2 and len(auto_keys) == 1 and auto_keys[0].startswith("auto-")
    assert specs[auto_keys[0]].engine == "classical" and specs[auto_keys[0]].prompt == "auto"
    res = _jobs(store, "run")
    assert res.exit_code == 0, res.output
    assert "2 done" in res.output
    with JobStore(store) as s:
        done = {j.key: j.result_uri for j in s.jobs(DONE)}
    tiff = Path(done[auto_keys[0]])
    prov = json.loads(tiff.with_name(tiff.name.replace(".ome.tiff", ".lpfm.json")).read_text())
    assert prov["engine"]["name"] == "auto" and set(prov["engine"]["qc"]["tasks"]) == {"denoise"}
    assert prov["engine"]["plan"]["tiles"] and "[lpfm auto]" in prov["output"]["name"]
    from lpfm_toolkit.jobs import compute

    again = compute(specs[auto_keys[0]])  # a repeat finds the output by the pipeline's key and does nothing
    assert again.skipped and again.uri == str(tiff) and again.key == prov["idempotency_key"]


def test_auto_job_with_nothing_flagged_is_done_without_output(sample_slide: Path, tmp_path: Path) -> None:
    store, out = tmp_path / "jobs.sqlite", tmp_path / "out"
    res = _jobs(
        store,
        "add",
        str(sample_slide),
        "--auto",
        "--engine",
        "classical",
        "--region",
        "900,1200,480,480",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    res = _jobs(store, "run")
    assert res.exit_code == 0 and "1 done" in res.output, res.output
    with JobStore(store) as s:
        (job,) = s.jobs(DONE)
    assert job.result_uri.startswith("nothing flagged")
    assert not list(out.glob("*.ome.tiff"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auto", "-p", "denoise"], "not both"),
        ([], "no prompt given"),
        (["--auto", "--samples", "2"], "--samples"),
        (["--auto", "--engine", "classical", "--method", "nlm"], "--method"),
    ],
)
def test_auto_job_bad_input(args: list[str], message: str, noisy: Path, tmp_path: Path) -> None:
    res = _jobs(tmp_path / "jobs.sqlite", "add", str(noisy), *args, "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_qupath_entry_flagged_auto_becomes_an_auto_entry(qp, noisy: Path, tmp_path: Path) -> None:
    """A QuPath entry flagged ``lpfm.enhance = auto`` is an --auto job; its result is added as a new entry."""
    folder = qp.write_project(tmp_path / "project", noisy, entry_metadata={"lpfm.enhance": "auto"}, bioformats=True)
    store = tmp_path / "jobs.sqlite"
    res = _jobs(store, "add-qupath", str(folder), "--engine", "classical")
    assert res.exit_code == 0 and "added 1 job(s)" in res.output, res.output
    res = _jobs(store, "run")
    assert res.exit_code == 0, res.output
    data = json.loads((folder / "project.qpproj").read_text())
    (result,) = [e for e in data["images"] if "lpfm.idempotency_key" in e["metadata"]]
    assert result["imageName"].endswith("[lpfm auto]") and result["metadata"]["lpfm.source.entry"] == "1"
    with JobStore(store) as s:
        (job,) = s.jobs(DONE)
    assert job.key.startswith("auto-") and job.result_uri.endswith(f"#entry={result['entryID']}")
