"""Jobs: the SQLite store, runners (in-process, process pool, Dask), watchers and ``lpfm jobs`` end to end.

Engines are identity/classical on small images cut from the sample slide, so every test takes seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tifffile
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.errors import ConfigError, MissingDependencyError, SlideNotFoundError
from lpfm_toolkit.jobs import (
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    JobSpec,
    JobStore,
    LocalRunner,
    NewJob,
    SlurmOptions,
    add_jobs,
    execute,
    run_queued,
    scan_folder,
    slurm_kwargs,
    watch_folder,
)
from lpfm_toolkit.jobs.store import one_line_error, worker_id
from lpfm_toolkit.sinks.ometiff import read_provenance

REGION = (1000, 1300, 256, 192)


@pytest.fixture()
def store(tmp_path: Path) -> JobStore:
    with JobStore(tmp_path / "jobs.sqlite") as s:
        yield s


def spec(slide: Path, out: Path, **kw: object) -> JobSpec:
    base = {"prompt": "sr x2", "engine": "identity", "region": REGION}
    return JobSpec(source=str(slide), out=str(out), **{**base, **kw})  # type: ignore[arg-type]


def small_tiff(path: Path, sample_slide: Path, x: int = 1000, y: int = 1300, size: int = 256) -> Path:
    """A small RGB TIFF cut from the sample slide (whole-image jobs on it take a fraction of a second)."""
    from lpfm_toolkit.sources import open_image

    with open_image(sample_slide) as h:
        tifffile.imwrite(path, h.read_region(0, x, y, size, size), photometric="rgb")
    return path


def synthetic(n: int) -> list[NewJob]:
    return [NewJob(f"{i:064x}", {"source": f"s{i}", "prompt": "denoise", "out": "o"}, f"s{i}", f"job {i}")
            for i in range(n)]


# -- the store ------------------------------------------------------------------------------------------

def test_adding_the_same_work_twice_adds_it_once(store: JobStore, sample_slide: Path, tmp_path: Path) -> None:
    s = spec(sample_slide, tmp_path / "out")
    first = add_jobs(store, [s, s])
    assert len(first.added) == 1 and not first.existing
    again = add_jobs(store, [s])
    assert again.added == [] and again.existing == first.added
    assert store.counts() == {QUEUED: 1, RUNNING: 0, DONE: 0, FAILED: 0}
    # the job key is the pipeline's idempotency key: the output's provenance carries the same one
    run_queued(store, LocalRunner(1))
    job = store.get(first.added[0])
    assert job is not None and job.state == DONE and job.attempts == 1
    assert read_provenance(job.result_uri).idempotency_key == job.key
    assert add_jobs(store, [s]).added == []  # done work is not queued again either


def test_two_claimers_never_take_the_same_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    with JobStore(path) as s:
        s.add(synthetic(60))
    taken: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def claimer(name: str) -> None:
        with JobStore(path) as own:  # one connection each: real SQLite locking, as between processes
            barrier.wait()
            got: list[str] = []
            while jobs := own.claim(name, n=2):
                got += [j.key for j in jobs]
            taken[name] = got

    threads = [threading.Thread(target=claimer, args=(f"host:{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = [k for got in taken.values() for k in got]
    assert len(keys) == 60 and len(set(keys)) == 60
    with JobStore(path) as s:
        assert s.counts()[RUNNING] == 60


def test_a_job_left_running_by_a_dead_runner_is_requeued(store: JobStore) -> None:
    store.add(synthetic(3))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    a, b, c = (store.claim(w, lease_s=60)[0] for w in (f"{here}:{dead.pid}", worker_id(), "elsewhere:1"))
    assert store.requeue_stale() == [a.key]  # pid gone on this host; the live holder and the remote lease stay
    assert store.get(a.key).state == QUEUED and "died" in store.get(a.key).last_error
    assert store.get(b.key).state == RUNNING
    far_future = store.get(c.key).lease_until + 1
    assert set(store.requeue_stale(now=far_future)) == {b.key, c.key}  # leases expired
    # the attempt that crashed counts: at max_attempts it becomes failed instead
    job = store.claim("elsewhere:2", lease_s=-1)[0]
    assert store.requeue_stale(max_attempts=job.attempts) == [job.key]
    assert store.get(job.key).state == FAILED


def test_a_run_after_a_crash_finishes_the_abandoned_job(store: JobStore, sample_slide: Path, tmp_path: Path) -> None:
    (key,) = add_jobs(store, [spec(sample_slide, tmp_path / "out")]).added
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.claim(f"{socket.gethostname()}:{dead.pid}")  # as if a runner took it and was killed
    summary = run_queued(store, LocalRunner(1))
    assert summary.requeued == [key] and summary.done == 1
    job = store.get(key)
    assert job.state == DONE and job.attempts == 2 and job.worker is None


def test_an_interrupted_run_gives_its_job_back(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add(synthetic(1))

    def interrupted(spec: dict, threads: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lpfm_toolkit.jobs.runners.run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_queued(store, LocalRunner(1))
    (job,) = store.jobs()
    assert job.state == QUEUED and job.attempts == 0 and "interrupted" in job.last_error


def test_a_failing_job_records_one_line_and_fails_after_max_attempts(store: JobStore, sample_slide: Path,
                                                                    tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    (key,) = add_jobs(store, [spec(sample_slide, blocker / "out")]).added
    events: list[str] = []
    summary = run_queued(store, LocalRunner(1), max_attempts=2, on_event=lambda e, j, d: events.append(e))
    assert events == ["start", "retry", "start", "failed"]
    assert (summary.failed, summary.retried, summary.done) == (1, 1, 0)
    job = store.get(key)
    assert job.state == FAILED and job.attempts == 2
    assert "\n" not in job.last_error and job.last_error.startswith(("NotADirectoryError", "FileExistsError", "OutputExistsError"))
    assert run_queued(store, LocalRunner(1)).finished == 0  # failed stays failed until retried

    blocker.unlink()
    assert store.retry([key[:8]]) == [key]
    assert store.get(key).state == QUEUED and store.get(key).attempts == 0
    assert run_queued(store, LocalRunner(1)).done == 1
    assert store.get(key).state == DONE and Path(store.get(key).result_uri).exists()


def test_an_existing_output_is_checked_before_it_counts_as_already_done(sample_slide: Path, tmp_path: Path) -> None:
    s = spec(sample_slide, tmp_path / "out")
    with JobStore(tmp_path / "first.sqlite") as first:
        add_jobs(first, [s])
        run_queued(first, LocalRunner(1))
        (job,) = first.jobs(DONE)
    output = Path(job.result_uri)
    intact = output.read_bytes()
    for name, verify in (("intact", "quick"), ("full", "full")):  # an intact output is reused, also when checked fully
        with JobStore(tmp_path / f"{name}.sqlite") as store:
            add_jobs(store, [s])
            summary = run_queued(store, LocalRunner(1), verify=verify)
            assert (summary.skipped, summary.done, summary.remade) == (1, 0, 0)
    output.write_bytes(intact[: len(intact) // 2])  # damaged after it was made: truncated
    events: list[tuple[str, str]] = []
    with JobStore(tmp_path / "again.sqlite") as store:
        add_jobs(store, [s])
        summary = run_queued(store, LocalRunner(1), on_event=lambda e, j, d: events.append((e, d)))
    assert (summary.skipped, summary.done, summary.remade) == (0, 1, 1)
    assert events[-1][0] == "done" and "made again" in events[-1][1]
    assert read_provenance(output).idempotency_key == job.key and len(output.read_bytes()) > len(intact) // 2


def test_errors_are_one_line_without_secrets() -> None:
    exc = RuntimeError("login failed\npassword=hunter2 for alice; session key: 0123-abcd")
    line = one_line_error(exc)
    assert line == "RuntimeError: login failed password=*** for alice; session key: ***"
    assert len(one_line_error("x" * 2000)) == 500


def test_execute_is_idempotent(sample_slide: Path, tmp_path: Path) -> None:
    s = spec(sample_slide, tmp_path)
    uri = execute(s.to_dict())
    mtime = Path(uri).stat().st_mtime_ns
    assert execute(s) == uri and Path(uri).stat().st_mtime_ns == mtime


# -- runners --------------------------------------------------------------------------------------------

def _specs(sample_slide: Path, out: Path) -> list[JobSpec]:
    return [spec(sample_slide, out, engine="classical", prompt=p, region=(x, 1300, 192, 160))
            for p, x in (("sr x2", 900), ("denoise", 1100), ("deblur", 1300), ("sr x4", 700))]


def _checksums(store: JobStore) -> dict[str, str]:
    return {j.key: read_provenance(j.result_uri).output_sha256 for j in store.jobs(DONE)}


def test_a_pool_of_two_workers_gives_the_same_pixels_as_one(sample_slide: Path, tmp_path: Path) -> None:
    sums = []
    for workers in (1, 2):
        with JobStore(tmp_path / f"jobs{workers}.sqlite") as s:
            add_jobs(s, _specs(sample_slide, tmp_path / f"out{workers}"))
            runner = LocalRunner(workers)
            try:
                summary = run_queued(s, runner)
            finally:
                runner.close()
            assert summary.done == 4 and s.counts()[DONE] == 4
            sums.append(_checksums(s))
    assert sums[0] == sums[1]


def test_pool_workers_get_a_share_of_the_cores() -> None:
    runner = LocalRunner(2)
    assert runner.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    pool = runner._new_pool()
    try:
        from lpfm_toolkit.engine.device import process_threads

        got = pool.submit(process_threads).result(timeout=60)
        omp = pool.submit(os.getenv, "OMP_NUM_THREADS").result(timeout=60)
    finally:
        pool.shutdown()
    assert str(got) == omp == str(runner.threads)  # set before torch loads; engines built there use the cap


def test_dask_in_process_cluster_runs_jobs_end_to_end(sample_slide: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip(
        "distributed", reason="dask.distributed is not installed: the Dask runner is NOT tested here")
    from lpfm_toolkit.jobs import DaskRunner

    with JobStore(tmp_path / "jobs.sqlite") as s:
        add_jobs(s, _specs(sample_slide, tmp_path / "out")[:2])
        client = distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None)
        runner = DaskRunner(client)
        try:
            assert runner.capacity == 2
            summary = run_queued(s, runner)
        finally:
            runner.close()
        assert summary.done == 2 and s.counts()[DONE] == 2
        with JobStore(tmp_path / "local.sqlite") as local:  # the same pixels as in this process
            add_jobs(local, _specs(sample_slide, tmp_path / "out-local")[:2])
            run_queued(local, LocalRunner(1))
            assert _checksums(local) == _checksums(s)


def test_dask_jobs_reuse_freed_memory_under_the_nannys_malloc_setting() -> None:
    """Under MALLOC_TRIM_THRESHOLD_=65536 (Dask's nanny) every 8 MB temporary is a fresh mmap that page-faults;
    inside array_friendly_malloc the blocks are reused: counted in minor page faults, not in seconds."""
    code = (
        "import resource, numpy as np\n"
        "from lpfm_toolkit.jobs.runners import array_friendly_malloc\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(40):\n"
        "        a = np.ones(1 << 20)\n"
        "        del a\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "plain = faults()\n"
        "with array_friendly_malloc():\n"
        "    faults()\n"
        "    tuned = faults()\n"
        "print(plain, tuned)\n")
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    plain, tuned = map(int, out.split())
    assert plain > 40 * 100 and tuned < plain / 10, (plain, tuned)  # every array faults in vs (almost) none


def test_a_dask_job_gets_the_hosts_cores_shared_among_its_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed: NOT tested here")
    from lpfm_toolkit.jobs.runners import _dask_threads, free_cores

    monkeypatch.delenv("LPFM_THREADS", raising=False)
    assert _dask_threads() is None  # not on a worker: the process's settings stay
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None) as client:
        assert client.submit(_dask_threads, pure=False).result() == max(1, free_cores() // 2)
    monkeypatch.setenv("LPFM_THREADS", "3")
    assert _dask_threads() == 3


def test_slurm_options_and_a_clear_error_without_dask_jobqueue(monkeypatch: pytest.MonkeyPatch) -> None:
    from lpfm_toolkit.jobs import slurm_runner

    kw = slurm_kwargs(SlurmOptions(jobs=3, cores=8, memory="32GB", queue="gpu", account="lab", gpus=1,
                                   job_extra=("--qos=long",)))
    assert kw["cores"] == 8 and kw["processes"] == 1 and kw["queue"] == "gpu" and kw["account"] == "lab"
    assert kw["job_extra_directives"] == ["--qos=long", "--gres=gpu:1"]
    assert kw["worker_extra_args"] == ["--resources", "lpfm=1"]
    jobqueue = sys.modules.get("dask_jobqueue")
    if jobqueue is None:
        jobqueue = pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed: the Slurm job "
                                       "script is NOT checked here")
    with jobqueue.SLURMCluster(**kw, scheduler_options={"dashboard_address": None}) as cluster:
        script = cluster.job_script()  # what sbatch would get; nothing is submitted
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH --cpus-per-task=8", "#SBATCH --qos=long",
                 "#SBATCH --gres=gpu:1", "--resources lpfm=1", "--nthreads 8"):
        assert line in script
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'lpfm-toolkit\[dask\]'"):
        slurm_runner(SlurmOptions())


# -- watchers -------------------------------------------------------------------------------------------

def test_watcher_takes_settled_slides_skips_growing_files_and_its_own_outputs(
        store: JobStore, sample_slide: Path, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    small_tiff(folder / "a.tif", sample_slide)
    full = small_tiff(tmp_path / "b.tif", sample_slide, x=1200).read_bytes()
    growing = folder / "b.tif"
    growing.write_bytes(full[: len(full) // 2])
    (folder / "notes.txt").write_text("not a slide")
    template = JobSpec(source="", prompt="denoise", out=str(folder / "out"), engine="identity")

    def copy_more(seconds: float) -> None:  # the copy goes on between the two looks
        growing.write_bytes(full[: 3 * len(full) // 4])

    report = watch_folder(store, folder, template, settle_s=0, sleep=copy_more)
    assert len(report.added) == 1 and report.waiting == [str(growing.resolve())]
    assert store.jobs()[0].source == str((folder / "a.tif").resolve())
    run_queued(store, LocalRunner(1))
    assert any((folder / "out").glob("*.ome.tiff"))

    growing.write_bytes(full)  # the copy finished
    first = watch_folder(store, folder, template, settle_s=0, sleep=lambda s: None)
    assert len(first.added) == 1 and not first.waiting and not first.rejected
    assert watch_folder(store, folder, template, settle_s=0).added == []  # nothing new; outputs not taken
    assert [p.name for p in scan_folder(folder, recursive=True)] == ["a.tif", "b.tif"]


def test_watcher_takes_a_long_finished_file_without_waiting_the_settle_time(store: JobStore, sample_slide: Path,
                                                                           tmp_path: Path) -> None:
    import time

    folder = tmp_path / "incoming"
    folder.mkdir()
    small_tiff(folder / "old.tif", sample_slide)
    time.sleep(1.6)  # nothing touches it for longer than --settle (mtime and ctime)
    small_tiff(folder / "new.tif", sample_slide, x=1200)
    template = JobSpec(source="", prompt="denoise", out=str(tmp_path / "out"), engine="identity")
    slept: list[float] = []
    report = watch_folder(store, folder, template, settle_s=1.5, wait=False, sleep=slept.append)
    assert len(report.added) == 1 and store.jobs()[0].source.endswith("old.tif")
    assert report.waiting == [str((folder / "new.tif").resolve())] and slept == []


def test_watcher_reports_an_unreadable_file_once(store: JobStore, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "broken.svs").write_bytes(b"II*\x00 not really a slide")
    template = JobSpec(source="", prompt="denoise", out=str(tmp_path / "out"), engine="identity")
    first = watch_folder(store, folder, template, settle_s=0, sleep=lambda s: None)
    assert len(first.rejected) == 1 and first.added == []
    assert watch_folder(store, folder, template, settle_s=0).rejected == []
    with pytest.raises(SlideNotFoundError):
        watch_folder(store, tmp_path / "missing", template)


# -- QuPath --------------------------------------------------------------------------------------------

def write_project(folder: Path, image: Path, metadata: dict[str, str]) -> Path:
    """A one-entry QuPath 0.5 project around ``image`` (entry 1) with entry ``metadata``."""
    from lpfm_toolkit.integrations.qupath import uri_from_path

    folder.mkdir(parents=True)
    builder = {"builderType": "uri", "providerClassName": "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder",
               "uri": uri_from_path(image.resolve()), "args": [], "metadata": {"name": image.name}}
    entry = {"serverBuilder": builder, "entryID": 1, "randomizedName": "0e1f2a3b-4c5d-4e6f-8a7b-9c0d1e2f3a4b",
             "imageName": image.name, "metadata": metadata}
    project = {"version": "0.5.1", "createTimestamp": 1700000000000, "modifyTimestamp": 1700000000000,
               "uri": uri_from_path((folder / "project.qpproj").resolve()), "lastID": 1, "images": [entry]}
    (folder / "project.qpproj").write_text(json.dumps(project, indent=2), encoding="utf-8")
    return folder


def test_cli_qupath_flagged_entries_become_new_entries_once(sample_slide: Path, tmp_path: Path) -> None:
    image = small_tiff(tmp_path / "slide.tif", sample_slide)
    project = write_project(tmp_path / "project", image, {"lpfm.enhance": "sr x2"})
    store = str(tmp_path / "jobs.sqlite")
    runner = CliRunner()
    for _ in range(2):
        res = runner.invoke(cli, ["jobs", "add-qupath", str(project), "--engine", "identity", "--store", store])
        assert res.exit_code == 0, res.output
    assert "added 0 job(s), 1 already" in res.output
    for _ in range(2):
        res = runner.invoke(cli, ["jobs", "run", "--store", store])
        assert res.exit_code == 0, res.output
    data = json.loads((project / "project.qpproj").read_text())
    results = [e for e in data["images"] if "lpfm.idempotency_key" in e["metadata"]]
    assert len(results) == 1 and results[0]["metadata"]["lpfm.source.entry"] == "1"
    with JobStore(store) as s:
        (job,) = s.jobs(DONE)
        assert job.result_uri.endswith(f"#entry={results[0]['entryID']}")
        assert results[0]["metadata"]["lpfm.idempotency_key"] == job.key


# -- the CLI -------------------------------------------------------------------------------------------

def test_cli_add_run_status_retry(sample_slide: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    store = str(tmp_path / "jobs.sqlite")
    out = tmp_path / "out"
    region = ",".join(map(str, REGION))

    def jobs(*args: str):
        return runner.invoke(cli, ["jobs", *args, "--store", store])

    res = jobs("add", str(sample_slide), "-p", "sr x2", "--region", region, "--engine", "identity", "--out", str(out))
    assert res.exit_code == 0 and "added 1 job(s)" in res.output, res.output
    res = jobs("add", str(sample_slide), "-p", "sr x2", "--region", region, "--engine", "identity", "--out", str(out))
    assert "added 0 job(s), 1 already" in res.output
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    jobs("add", str(sample_slide), "-p", "denoise", "--region", region, "--engine", "identity", "--out", str(blocker))

    res = jobs("run", "--max-attempts", "1")
    assert res.exit_code == 1, res.output  # one job failed for good
    assert "1 done, 0 skipped, 1 failed" in res.output and "│ failed" in res.output  # the summary table
    res = jobs("status")
    assert res.exit_code == 0 and "failed" in res.output and "Error" in res.output
    status = json.loads(jobs("status", "--json").output)
    assert status["counts"] == {"queued": 0, "running": 0, "done": 1, "failed": 1}

    res = jobs("retry")
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "error:" in res.output
    assert "queued 1 failed job(s) again" in jobs("retry", "--failed").output
    blocker.unlink()
    res = jobs("run", "--workers", "1")
    assert res.exit_code == 0 and "1 done" in res.output, res.output
    assert len(list(out.glob("*.ome.tiff"))) == 1 and len(list(blocker.glob("*.ome.tiff"))) == 1

    res = jobs("add", str(tmp_path / "missing.svs"), "-p", "sr x2", "--out", str(out))
    assert res.exit_code == 2 and "missing.svs does not exist" in res.output and "Traceback" not in res.output


def test_progress_lines_carry_the_count_and_an_eta() -> None:
    from lpfm_toolkit.batch import EtaClock, Outcome, Status
    from lpfm_toolkit.cli.batch import eta_text

    now = [0.0]
    eta = EtaClock(8, clock=lambda: now[0])
    assert eta.eta() is None  # nothing to go by yet
    now[0] = 30.0
    eta.finish(Outcome("a", Status.DONE))
    eta.finish(Outcome("b", Status.DONE))
    assert eta_text(eta.eta()) == "ETA 1:30"  # 15 s per computed job, 6 left
    eta.finish(Outcome("c", Status.SKIPPED))
    assert eta_text(eta.eta()) == "ETA 1:15"  # skipped jobs cost nothing: the rate is of computed ones
    assert eta_text(7200.0 * 2) == "ETA 4:00:00"


def test_cli_watch_once(sample_slide: Path, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    small_tiff(folder / "a.tif", sample_slide)
    store = str(tmp_path / "jobs.sqlite")
    args = ["jobs", "watch", str(folder), "-p", "denoise", "--engine", "identity", "--out", str(folder / "out"),
            "--once", "--settle", "0", "--store", store]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "added 1 job(s)" in res.output and "1 done" in res.output, res.output
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "added 0 job(s)" in res.output and "1 done" not in res.output
    assert len(list((folder / "out").glob("*.ome.tiff"))) == 1
    res = CliRunner().invoke(cli, ["jobs", "watch", "--store", store])
    assert res.exit_code == 2 and "nothing to watch" in res.output


def test_omero_jobs_without_omero_py_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "omero", None)  # as where omero-py is not installed (Python 3.11 here)
    monkeypatch.setitem(sys.modules, "omero.gateway", None)
    store = tmp_path / "jobs.sqlite"
    for args in (["add-omero", "--tagged"], ["watch", "--omero", "--once"]):
        res = CliRunner().invoke(cli, ["jobs", *args, "--store", str(store)])
        assert res.exit_code == 2 and "pip install 'lpfm-toolkit[omero]'" in res.output, res.output
    assert not store.exists()


def test_importing_jobs_imports_no_torch_and_no_dask() -> None:
    code = ("import sys, lpfm_toolkit.jobs, lpfm_toolkit.cli.jobs; "
            "print(sorted(m for m in ('torch', 'dask', 'distributed', 'paquo', 'omero') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_jobs_imports_no_connector_and_kinds_resolve_lazily() -> None:
    code = ("import sys, lpfm_toolkit.jobs as j; "
            "s = j.JobSpec(source='/p/project.qpproj', entry='1', kind='qupath', prompt='sr x2', out=''); "
            "t = j.JobSpec(source='omero://h:4064', entry='7', kind='omero', prompt='sr x2', out=''); "
            "print(sorted(m for m in sys.modules if m.startswith('lpfm_toolkit.integrations')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # specs of every kind are made without importing their connector
    from lpfm_toolkit.jobs.sources import kinds, register_source, source_for

    assert set(kinds()) >= {"file", "qupath", "omero"}
    assert type(source_for("qupath")).__module__ == "lpfm_toolkit.integrations.qupath.jobsource"
    register_source("mine", "lpfm_toolkit.jobs.sources:FileSource")
    assert JobSpec(source="/a.svs", prompt="sr x2", out="/o", kind="mine").kind == "mine"
    with pytest.raises(ConfigError, match="unknown job kind"):
        JobSpec(source="/a.svs", prompt="sr x2", out="/o", kind="nope")


def test_a_spec_round_trips_through_json() -> None:
    s = JobSpec(source="/a.svs", prompt="sr x2", out="/o", region=(1, 2, 3, 4), remaps=("C:/x=/y",))
    assert JobSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert "roi_classes" not in s.to_dict()  # fields added later are left out at their defaults (same recipes)
    o = JobSpec(source="omero://h:4064", entry="7", kind="omero", prompt="sr x2", out="", roi_classes=("Tumor",),
                output_mode="channels", target_dataset="results")
    assert JobSpec.from_dict(json.loads(json.dumps(o.to_dict()))) == o
