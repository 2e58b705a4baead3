"""Jobs on a local process pool vs a local Dask cluster, same cores, same threads per job.

Eight 768x768 RGB slides (tiled TIFFs cut from the bundled sample slide), ``-p deblur --engine classical
--method richardson_lucy``; each configuration runs the same eight jobs into its own output folder:

* ``pool2``: ``LocalRunner(workers=2)`` (what ``lpfm jobs run --workers 2`` does: 1 math thread per worker here);
* ``dask2``: a ``LocalCluster`` of two worker processes with one thread each (``dask worker --nthreads 1``);
* ``dask1``: the same with one worker (for the 1 -> 2 worker scaling);
* ``dask2-plain`` (``--plain``): two Dask workers running the bare job function, i.e. what the runner did
  before :func:`lpfm_toolkit.jobs.runners.dask_job` (no allocator tuning, no thread share);
* ``pool2-trim-env`` (``--plain``): the pool started with ``MALLOC_TRIM_THRESHOLD_=65536`` in the environment
  (what a process that started a ``LocalCluster`` passes on: distributed leaves it in ``os.environ``).

Per job the time is the pipeline's own ``durations.total_s`` from each output's provenance; wall time is the
whole run; CPU seconds per job are those of the worker processes (``RUSAGE_CHILDREN`` once they ended), which
do not depend on what else the machine runs. Prints ratios (the numbers that go into docs/benchmarks.md) and writes JSON with ``--json``.

    python benchmarks/dask_bench.py [--plain] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SLIDE = Path(__file__).resolve().parents[1] / "lpfm_toolkit" / "data" / "cmu_small_region.svs"
SIZE = 768
ORIGINS = [(0, 0), (700, 0), (1400, 0), (0, 800), (700, 800), (1400, 800), (0, 1600), (700, 1600)]


def make_slides(folder: Path) -> list[Path]:
    import tifffile

    from lpfm_toolkit.sources import open_image

    paths = []
    with open_image(SLIDE) as h:
        for i, (x, y) in enumerate(ORIGINS):
            p = folder / f"slide{i}.tif"
            tifffile.imwrite(p, h.read_region(0, x, y, SIZE, SIZE), photometric="rgb", tile=(256, 256))
            paths.append(p)
    return paths


def run(name: str, slides: list[Path], root: Path, runner: Any) -> dict[str, Any]:
    """Run the eight jobs on ``runner`` into ``root/name``; wall time, CPU seconds and per-job times."""
    from lpfm_toolkit.jobs import JobSpec, JobStore, add_jobs, run_queued
    from lpfm_toolkit.sinks.ometiff import read_provenance

    out = root / name
    specs = [
        JobSpec(source=str(p), prompt="deblur", out=str(out), engine="classical", method="richardson_lucy")
        for p in slides
    ]
    with JobStore(root / f"{name}.sqlite") as store:
        add_jobs(store, specs)
        cpu0 = children_cpu()
        t0 = time.perf_counter()
        try:
            summary = run_queued(store, runner)
        finally:
            runner.close()
        wall = time.perf_counter() - t0
        time.sleep(2.0)  # let the closed pool's / cluster's worker processes be reaped
        cpu = children_cpu() - cpu0
        jobs = store.jobs()
    assert summary.done == len(slides), summary
    provs = [read_provenance(j.result_uri) for j in jobs]
    per_job = [p.durations["total_s"] for p in provs]
    return {
        "name": name,
        "wall_s": round(wall, 2),
        "cpu_s_per_job": round(cpu / len(slides), 3),
        "job_mean_s": round(statistics.mean(per_job), 3),
        "job_median_s": round(statistics.median(per_job), 3),
        "checksums": sorted(p.output_sha256 for p in provs),
    }


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's ended child processes: the workers, once closed.

    Unlike wall time this does not depend on what else the machine runs, so it compares the work a job
    costs in each configuration even on a busy machine.
    """
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def warm(pause: float = 0.0) -> int:
    """What a worker imports for its first job, without doing one (for the start-up cost)."""
    import skimage.restoration  # noqa: F401

    import lpfm_toolkit.engine.classical  # noqa: F401
    import lpfm_toolkit.jobs.spec  # noqa: F401
    import lpfm_toolkit.pipeline  # noqa: F401

    time.sleep(pause)  # (idle: no CPU) so that two submitted together land on two processes
    return os.getpid()


def startup_cpu(kind: str) -> float:
    """CPU seconds of starting two workers of ``kind`` (pool or dask), importing what a job needs, stopping."""
    from lpfm_toolkit.jobs import LocalRunner

    cpu0 = children_cpu()
    if kind == "pool":
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # see main()
        pool = LocalRunner(2)._new_pool()
        futures = [pool.submit(warm, 3.0) for _ in range(2)]  # submitted together: two processes start
        pids = {f.result() for f in futures}
        pool.shutdown(wait=True)
    else:
        runner = dask(2, False)
        pids = set(runner.client.run(warm).values())
        runner.close()
    assert len(pids) == 2, pids
    time.sleep(2.0)
    return children_cpu() - cpu0


def dask(n: int, plain: bool) -> Any:
    from distributed import Client, LocalCluster

    from lpfm_toolkit.jobs import DaskRunner
    from lpfm_toolkit.jobs.spec import run_job

    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    runner = DaskRunner(Client(cluster), cluster=cluster)
    if plain:  # the job function as it was submitted before dask_job: no allocator tuning, threads=None
        runner.submit = lambda spec: runner.client.submit(run_job, spec, None, pure=False)  # type: ignore[method-assign]
    runner.client.wait_for_workers(n)
    return runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plain", action="store_true", help="also run the bare job function on two Dask workers")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    from lpfm_toolkit.jobs import LocalRunner

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lpfm-dask-bench-") as tmp:
        root = Path(tmp)
        slides = make_slides(root)
        startup = {"pool": startup_cpu("pool"), "dask": startup_cpu("dask")}
        # distributed's LocalCluster leaves MALLOC_TRIM_THRESHOLD_=65536 in this process's os.environ, and a
        # pool started afterwards inherits it: the pool runs as users get it, without the variable
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        results = [
            run("pool2", slides, root, LocalRunner(2)),
            run("dask2", slides, root, dask(2, False)),
            run("dask1", slides, root, dask(1, False)),
        ]
        if args.plain:
            results.append(run("dask2-plain", slides, root, dask(2, True)))
            os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"  # a pool started where the nanny's setting leaked
            results.append(run("pool2-trim-env", slides, root, LocalRunner(2)))
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    by = {r["name"]: r for r in results}
    for r in results:  # the work of the jobs alone: the start-up of that many workers taken off
        n_workers = 1 if r["name"] == "dask1" else 2
        start = startup["pool" if r["name"].startswith("pool") else "dask"] * n_workers / 2
        r["cpu_s_per_job_without_startup"] = round(r["cpu_s_per_job"] - start / len(slides), 3)
    same = all(r["checksums"] == by["pool2"]["checksums"] for r in results)
    ratios = {
        "dask2 job / pool2 job (mean total_s)": round(by["dask2"]["job_mean_s"] / by["pool2"]["job_mean_s"], 3),
        "dask2 wall / pool2 wall": round(by["dask2"]["wall_s"] / by["pool2"]["wall_s"], 3),
        "dask2 / pool2 CPU seconds per job": round(by["dask2"]["cpu_s_per_job"] / by["pool2"]["cpu_s_per_job"], 3),
        "dask2 / pool2 CPU seconds per job, start-up taken off": round(
            by["dask2"]["cpu_s_per_job_without_startup"] / by["pool2"]["cpu_s_per_job_without_startup"], 3
        ),
        "dask 1 -> 2 workers speed-up (wall)": round(by["dask1"]["wall_s"] / by["dask2"]["wall_s"], 3),
    }
    if "dask2-plain" in by:
        ratios["dask2-plain job / pool2 job"] = round(by["dask2-plain"]["job_mean_s"] / by["pool2"]["job_mean_s"], 3)
        ratios["dask2-plain wall / pool2 wall"] = round(by["dask2-plain"]["wall_s"] / by["pool2"]["wall_s"], 3)
        ratios["pool2 with MALLOC_TRIM_THRESHOLD_ / pool2 CPU seconds per job"] = round(
            by["pool2-trim-env"]["cpu_s_per_job"] / by["pool2"]["cpu_s_per_job"], 3
        )
        ratios["dask2-plain / pool2 CPU seconds per job, start-up taken off"] = round(
            by["dask2-plain"]["cpu_s_per_job_without_startup"] / by["pool2"]["cpu_s_per_job_without_startup"], 3
        )
        ratios["dask2-plain / pool2 CPU seconds per job"] = round(
            by["dask2-plain"]["cpu_s_per_job"] / by["pool2"]["cpu_s_per_job"], 3
        )
    report = {
        "cores": len(os.sched_getaffinity(0)),
        "startup_cpu_s_two_workers": {k: round(v, 3) for k, v in startup.items()},
        "load_before": [round(v, 2) for v in load],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "identical_pixels": same,
        "runs": [{k: v for k, v in r.items() if k != "checksums"} for r in results],
        "ratios": ratios,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
