"""``lpfm jobs``: queue work in a SQLite job store, run it on a local pool, Dask or Slurm, watch folders."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lpfm_toolkit.cli.batch import batch_progress, eta_text, summary_table
from lpfm_toolkit.cli.common import console, err_console, fail, handle_errors
from lpfm_toolkit.cli.local import check_out_folder, name_option
from lpfm_toolkit.cli.options import engine_flag_list, options_from_flags
from lpfm_toolkit.errors import ConfigError

STORE_ENV = "LPFM_JOBS_STORE"


def store_option(func: Any) -> Any:
    return click.option("--store", "store_path", type=click.Path(path_type=Path), envvar=STORE_ENV,
                        default="lpfm-jobs.sqlite", show_default=True,
                        help=f"The job store (SQLite, on a local disk; or ${STORE_ENV}).")(func)


#: the engine and run flags a job stores (threads are the runner's: each worker gets its share of the cores)
JOB_FLAGS = ("engine", "method", "model", "device", "steps", "samples", "sampler", "tta", "trust_pickle", "compile",
             "seed", "tile_size", "overlap", "compression", "tiff_tile")


def spec_options(func: Any) -> Any:
    """Options that say what each job does (defaults from lpfm's settings, as for `lpfm enhance`)."""
    opts = [
        click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to read."),
        *engine_flag_list("auto: the default model bundle if installed, else classical (fixed when added).",
                          only=JOB_FLAGS),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def run_options(func: Any) -> Any:
    """Where and how queued jobs run."""
    opts = [
        click.option("--workers", type=int, default=1, show_default=True,
                     help="Local worker processes (1: in this process). Each gets cores/N math threads."),
        click.option("--dask-scheduler", default=None, metavar="ADDRESS",
                     help="Run on this Dask scheduler (tcp://host:8786) instead of locally."),
        click.option("--slurm", is_flag=True, help="Start Dask workers as Slurm jobs (dask-jobqueue) and run there."),
        click.option("--slurm-jobs", type=int, default=1, show_default=True, help="Slurm jobs (one Dask worker each)."),
        click.option("--slurm-cores", type=int, default=4, show_default=True, help="Cores per Slurm job."),
        click.option("--slurm-memory", default="16GB", show_default=True, help="Memory per Slurm job."),
        click.option("--slurm-walltime", default="04:00:00", show_default=True, help="Time limit per Slurm job."),
        click.option("--slurm-queue", default=None, help="Slurm partition."),
        click.option("--slurm-account", default=None, help="Slurm account to charge."),
        click.option("--slurm-gpus", type=int, default=0, show_default=True, help="GPUs per Slurm job (--gres)."),
        click.option("--slurm-extra", multiple=True, help="More #SBATCH directives, e.g. --slurm-extra=--qos=long."),
        click.option("--slurm-local-directory", default=None, help="Scratch folder on the compute nodes."),
        click.option("--slurm-python", default=None,
                     help="The Python (with lpfm-toolkit) on the compute nodes (default: this one's path)."),
        click.option("--slurm-interface", default=None,
                     help="Network interface the compute nodes reach this host on (e.g. ib0)."),
        click.option("--max-attempts", type=int, default=3, show_default=True,
                     help="Attempts per job before it stays failed (until `lpfm jobs retry`)."),
        click.option("--lease", "lease_s", type=float, default=600, show_default=True,
                     help="Seconds after which a job whose runner stopped renewing it is requeued."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _template(prompt: str, out: str | None, level: int, region: tuple[int, int, int, int] | None,
              trust_pickle: bool | None, flags: dict[str, Any], name: str | None = None) -> Any:
    """A :class:`JobSpec` without a source, from the options and the user's settings; ``name``: ``--name``
    (checked here, before any model loads)."""
    from lpfm_toolkit.jobs import JobSpec

    check_out_folder(out)
    options, st = options_from_flags({**flags, "trust_pickle": trust_pickle})
    return JobSpec(source="", prompt=prompt, out=out if out is not None else st.output_dir, level=level,
                   region=region, seed=st.seed, tile=st.tile_size, overlap=st.overlap, compression=st.compression,
                   tiff_tile=st.tiff_tile, name=name, **JobSpec.options_fields(options))


def auto_option(func: Any) -> Any:
    return click.option("--auto", is_flag=True, help="Enhance only what lpfm qc flags, each region with its task "
                        "(as `lpfm enhance --auto`; the same as -p auto).")(func)


def _auto_prompt(prompt: str | None, auto: bool, required: bool = False) -> str | None:
    """The job prompt: ``auto`` for ``--auto``; refuses both, or (``required``) neither."""
    from lpfm_toolkit.jobs.auto import AUTO_PROMPT, is_auto

    if auto and prompt is not None and not is_auto(prompt):
        raise ConfigError("give -p PROMPT or --auto, not both", "--auto lets QC choose each region's task")
    if auto:
        return AUTO_PROMPT
    if required and not prompt:
        raise ConfigError("no prompt given", 'give -p PROMPT (e.g. -p "sr x2") or --auto')
    return prompt


def _open_store(path: Path, *, create: bool = False, readonly: bool = False) -> Any:
    """The job store at ``path``; ``create`` makes a missing one (commands that add work), ``readonly``: status."""
    from lpfm_toolkit.jobs import JobStore

    return JobStore(path, create=create, readonly=readonly)


def _report_added(report: Any, store_path: Path) -> None:
    for source, error in report.rejected:
        err_console.print(f"not added: {source}: {error}", style="red", markup=False)
    console.print(f"added {len(report.added)} job(s), {len(report.existing)} already in {store_path}"
                  + (f", {len(report.rejected)} not added" if report.rejected else "")
                  + (f", {len(report.waiting)} file(s) still changing" if getattr(report, "waiting", None) else ""))


@click.group()
def jobs() -> None:
    """Queue enhancements in a job store and run them (local pool, Dask, Slurm); watch folders.

    Jobs are keyed by lpfm's idempotency key: adding the same work twice adds nothing, and a run that
    crashes resumes where it stopped. See docs/jobs.md.
    """


@jobs.command("add")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-p", "--prompt", default=None, help='What to do, e.g. "sr x2", "denoise" (or --auto).')
@auto_option
@click.option("--out", default=None, help="Output folder (default: the output_dir setting, lpfm-out/).")
@click.option("--region", "region_text", default=None, help="x,y,width,height at the level (default: all).")
@name_option
@spec_options
@store_option
@handle_errors
def add(slides: tuple[Path, ...], prompt: str, out: str | None, region_text: str | None, name: str | None,
        level: int, trust_pickle: bool, store_path: Path, auto: bool = False, **flags: Any) -> None:
    """Queue SLIDES (files, or folders of slides) for enhancement by PROMPT."""
    import dataclasses

    from lpfm_toolkit.jobs import add_jobs, scan_folder
    from lpfm_toolkit.sources import Region

    prompt = _auto_prompt(prompt, auto, required=True)
    region = Region.parse(region_text).as_tuple() if region_text else None
    template = _template(prompt, out, level, region, trust_pickle, flags, name)
    files: list[Path] = []
    for s in slides:
        files += scan_folder(s) if s.is_dir() else [s]
    if not files:
        raise ConfigError("no slides found in " + ", ".join(map(str, slides)), "give slide files or a folder of them")
    with _open_store(store_path, create=True) as store:
        report = add_jobs(store, [dataclasses.replace(template, source=str(f)) for f in files])
    _report_added(report, store_path)


@jobs.command("add-qupath")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", default=None,
              help="The prompt (for --image entries, or entries whose flag is just 'true'); a flag 'auto' is --auto.")
@auto_option
@click.option("--image", "images", multiple=True, help="Entry ID or name (repeatable). Default: flagged entries.")
@click.option("--flag-key", default="lpfm.enhance", show_default=True,
              help="Metadata key that flags an entry; its value is the prompt.")
@click.option("--out", default=None, help="Output folder (default: the project's lpfm-outputs/).")
@click.option("--remap", "remaps", multiple=True, metavar="OLD=NEW", help="Where moved images are now.")
@name_option
@spec_options
@store_option
@handle_errors
def add_qupath(project: Path, prompt: str | None, images: tuple[str, ...], flag_key: str, out: str | None,
               remaps: tuple[str, ...], name: str | None, level: int, trust_pickle: bool, store_path: Path,
               auto: bool = False, **flags: Any) -> None:
    """Queue entries of a QuPath PROJECT: those flagged in their metadata (lpfm.enhance = prompt), or --image ones.

    Each result is added to the project as a new entry when its job finishes (close the project in QuPath).
    """
    import dataclasses

    from lpfm_toolkit.jobs import add_jobs, qupath_specs

    prompt = _auto_prompt(prompt, auto)
    if images and not prompt:
        raise ConfigError("--image needs --prompt", "say what to do with the chosen entries")
    template = dataclasses.replace(_template(prompt or "", out or "", level, None, trust_pickle, flags, name),
                                   remaps=tuple(remaps))
    specs = qupath_specs(project, template, prompt=prompt, images=list(images) or None, flag_key=flag_key)
    if not specs:
        raise ConfigError(f"no entry of {project} is flagged with {flag_key}",
                          f"set the metadata {flag_key} = a prompt on entries in QuPath, or use --image")
    with _open_store(store_path, create=True) as store:
        report = add_jobs(store, specs)
    _report_added(report, store_path)


def _omero_settings(host: str | None, port: int | None) -> Any:
    """The OMERO server for jobs: host/port from flags, ``OMERO_*`` or the settings file; credentials only from
    the environment (``OMERO_USER`` + ``OMERO_PASSWORD``, or ``OMERO_SESSION_KEY``): jobs never prompt."""
    from lpfm_toolkit.config import load_settings
    from lpfm_toolkit.integrations.omero.session import OmeroSettings, omero_modules

    omero_modules()  # a clear "install lpfm-toolkit[omero]" first
    settings = OmeroSettings.resolve(host=host, port=port, settings=load_settings())
    settings.check()
    return settings


def omero_options(func: Any) -> Any:
    """Where the OMERO server is, and where results go (as for `lpfm omero enhance`)."""
    opts = [
        click.option("--omero-host", default=None, help="OMERO server (or OMERO_HOST / omero_host). Credentials "
                     "come from OMERO_USER + OMERO_PASSWORD or OMERO_SESSION_KEY in the environment."),
        click.option("--omero-port", type=int, default=None, help="OMERO port (default 4064)."),
        click.option("--roi-class", "roi_classes", multiple=True,
                     help="Only the ROIs of this class, one result each (repeatable); default: the whole image."),
        click.option("--output", "output_mode", type=click.Choice(["new", "channels"]), default="new",
                     show_default=True, help="new: the enhanced image; channels: original + enhanced as one image."),
        click.option("--target-dataset", default=None,
                     help="Dataset id or name for the results (default: the original's dataset)."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _omero_template(prompt: str, level: int, trust_pickle: bool, flags: dict[str, Any], roi_classes: tuple[str, ...],
                    output_mode: str, target_dataset: str | None) -> Any:
    import dataclasses

    return dataclasses.replace(_template(prompt, "", level, None, trust_pickle, flags), roi_classes=tuple(roi_classes),
                               output_mode=output_mode, target_dataset=target_dataset)


@jobs.command("add-omero")
@click.option("-p", "--prompt", default=None, help='What to do with --image/--dataset/--project images, e.g. "sr x2".')
@auto_option
@click.option("--image", "image_ids", type=int, multiple=True, help="OMERO image id (repeatable).")
@click.option("--dataset", "dataset_ids", type=int, multiple=True, help="Every image of this dataset (repeatable).")
@click.option("--project", "project_ids", type=int, multiple=True, help="Every image of this project (repeatable).")
@click.option("--tagged", is_flag=True, help="Also every image tagged lpfm:<prompt> or with the key-value pair "
              "lpfm.enhance = <prompt> (each with its own prompt).")
@omero_options
@spec_options
@store_option
@handle_errors
def add_omero(prompt: str | None, image_ids: tuple[int, ...], dataset_ids: tuple[int, ...],
              project_ids: tuple[int, ...], tagged: bool, omero_host: str | None, omero_port: int | None,
              roi_classes: tuple[str, ...], output_mode: str, target_dataset: str | None, level: int,
              trust_pickle: bool, store_path: Path, auto: bool = False, **flags: Any) -> None:
    """Queue OMERO images (--image, --dataset, --project) for PROMPT, and/or the images users tagged (--tagged).

    Results become new OMERO images next to the originals (as `lpfm omero enhance` makes them); each original
    is then tagged lpfm:done or lpfm:failed with a key-value note. See docs/omero.md.
    """
    from lpfm_toolkit.integrations.omero.jobsource import (
        find_requests,
        image_ids_of,
        omero_specs,
        queue,
        server_uri,
        session_for,
    )

    prompt = _auto_prompt(prompt, auto)
    if not (image_ids or dataset_ids or project_ids or tagged):
        raise ConfigError("nothing selected", "give --image, --dataset or --project with -p, or --tagged")
    if (image_ids or dataset_ids or project_ids) and not prompt:
        raise ConfigError("--image/--dataset/--project need --prompt", 'say what to do with them, e.g. -p "sr x2"')
    settings = _omero_settings(omero_host, omero_port)
    template = _omero_template(prompt or "", level, trust_pickle, flags, roi_classes, output_mode, target_dataset)
    session = session_for(server_uri(settings))
    ids = image_ids_of(session, images=image_ids, datasets=dataset_ids, projects=project_ids)
    requests = find_requests(session) if tagged else []
    specs = omero_specs(session, template, image_ids=ids, requests=requests, prompt=prompt)
    if not specs:
        raise ConfigError("no OMERO image to queue", "tag images lpfm:<prompt> in OMERO.web, or give --image/--dataset")
    with _open_store(store_path, create=True) as store:
        report = queue(store, specs)
    _report_added(report, store_path)


def _runner(workers: int, dask_scheduler: str | None, slurm: bool, opts: dict[str, Any]) -> Any:
    from lpfm_toolkit.jobs import LocalRunner, SlurmOptions, dask_runner, slurm_runner

    if dask_scheduler and slurm:
        raise ConfigError("--dask-scheduler and --slurm exclude each other", "choose one")
    if dask_scheduler:
        return dask_runner(dask_scheduler)
    if slurm:
        return slurm_runner(SlurmOptions(
            jobs=opts["slurm_jobs"], cores=opts["slurm_cores"], memory=opts["slurm_memory"],
            walltime=opts["slurm_walltime"], queue=opts["slurm_queue"], account=opts["slurm_account"],
            gpus=opts["slurm_gpus"], job_extra=tuple(opts["slurm_extra"]),
            local_directory=opts["slurm_local_directory"], interface=opts["slurm_interface"],
            python=opts["slurm_python"]))
    return LocalRunner(workers)


@contextmanager
def _events(total: int) -> Iterator[tuple[Callable[[str, Any, str], None], list[Any]]]:
    """The shared batch display over jobs (with its ETA), one line per finished job with its count and the ETA;
    yields the runner's event callback and the list the finished jobs' outcomes collect in."""
    from lpfm_toolkit.batch import BatchProgress, EtaClock, Outcome, Status

    eta = EtaClock(total)
    outcomes: list[Outcome] = []
    statuses = {"done": Status.DONE, "skipped": Status.SKIPPED, "failed": Status.FAILED}
    with batch_progress("lpfm jobs run", eager=True) as progress:
        progress(BatchProgress(0, total, "", 0))

        def on_event(event: str, job: Any, detail: str) -> None:
            if event == "start":
                return
            if event in statuses:
                failed = event == "failed"
                outcome = Outcome(job.label, statuses[event], result=None if failed else detail,
                                  error=detail if failed else None)
                outcomes.append(outcome)
                eta.finish(outcome)
            elif event == "retry":
                eta.computed += 1  # it took its time; it is queued again
            eta.total = max(eta.total, eta.finished)
            style = {"done": "green", "skipped": None, "retry": "yellow", "failed": "red"}[event]
            where = f"{eta.finished}/{eta.total}" + (f" · {eta_text(left)}" if (left := eta.eta()) else "")
            console.print(f"[{where}] {event}: {job.label} → {detail}", style=style, markup=False)
            progress(BatchProgress(eta.finished, eta.total, job.label, eta.finished, eta_s=eta.eta()))

        yield on_event, outcomes


def _run(store: Any, runner: Any, max_attempts: int, lease_s: float, verify: str = "quick") -> Any:
    """Run the queue; SIGTERM and Ctrl-C hand the jobs back, stop the workers and remove their scratch."""
    from lpfm_toolkit.errors import LpfmError
    from lpfm_toolkit.jobs import Terminated, clean_store_scratch, run_queued, sigterm_interrupts

    counts = store.counts()
    with sigterm_interrupts(), _events(counts["queued"] + counts["running"]) as (on_event, outcomes):
        try:
            summary = run_queued(store, runner, max_attempts=max_attempts, lease_s=lease_s, on_event=on_event,
                                 verify=verify)
        except BaseException as exc:
            runner.close(abort=True)
            try:
                clean_store_scratch(store, own=True)  # every job of this run has stopped writing
            except LpfmError:
                pass  # the store itself failed: the error being raised says so
            if isinstance(exc, Terminated):
                fail("stopped by SIGTERM", "the jobs in flight were queued again; re-run to continue", 143)
            raise
        runner.close()
    if outcomes:
        console.print(summary_table(outcomes, "lpfm jobs run"))
    return summary


def _summary_line(summary: Any) -> str:
    return (f"{summary.done} done, {summary.skipped} skipped, {summary.failed} failed, "
            f"{summary.retried} retried" + (f", {len(summary.requeued)} requeued after a crash"
                                             if summary.requeued else "")
            + (f", {summary.remade} damaged earlier output(s) made again" if summary.remade else ""))


@jobs.command("run")
@click.option("--verify", is_flag=True, help="Check existing outputs fully (decode every level against its "
              "checksums) before a job counts as already done; without it the check is quick (header, levels, "
              "size, provenance).")
@run_options
@store_option
@handle_errors
def run(verify: bool, workers: int, dask_scheduler: str | None, slurm: bool, max_attempts: int, lease_s: float,
        store_path: Path, **slurm_opts: Any) -> None:
    """Run every queued job (exit status 1 if any job failed for good; 143 when stopped by SIGTERM)."""
    import sys

    with _open_store(store_path) as store:
        summary = _run(store, _runner(workers, dask_scheduler, slurm, slurm_opts), max_attempts, lease_s,
                       "full" if verify else "quick")
    console.print(_summary_line(summary))
    if summary.failed:
        sys.exit(1)


@jobs.command("status")
@click.option("--all", "show_all", is_flag=True, help="List every job, not only failed and running ones.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@store_option
@handle_errors
def status(show_all: bool, as_json: bool, store_path: Path) -> None:
    """Jobs per state, and the failed ones with their last error."""
    with _open_store(store_path, readonly=True) as store:
        counts = store.counts()
        listed = store.jobs() if show_all else [*store.jobs("running"), *store.jobs("failed")]
    if as_json:
        console.print_json(json.dumps({"counts": counts, "jobs": [
            {"key": j.key, "state": j.state, "source": j.source, "label": j.label, "attempts": j.attempts,
             "last_error": j.last_error, "result": j.result_uri, "worker": j.worker} for j in listed]}))
        return
    table = Table(title=f"jobs in {store_path}")
    for state in counts:
        table.add_column(state, justify="right")
    table.add_row(*(str(n) for n in counts.values()))
    console.print(table)
    if not listed:
        return
    detail = Table(show_lines=False)
    for col in ("key", "state", "job", "attempts", "worker / result / last error"):
        detail.add_column(col, overflow="fold")
    for j in listed:
        info = {"running": j.worker, "failed": j.last_error, "done": j.result_uri}.get(j.state) or j.last_error or ""
        style = {"failed": "red", "running": "yellow"}.get(j.state)
        detail.add_row(j.key[:12], j.state, j.label, str(j.attempts), info, style=style)
    console.print(detail)


@jobs.command("retry")
@click.argument("keys", nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Retry every failed job.")
@store_option
@handle_errors
def retry(keys: tuple[str, ...], all_failed: bool, store_path: Path) -> None:
    """Queue failed jobs again (KEYS: key prefixes as `status` shows them, or --failed for all)."""
    if not keys and not all_failed:
        raise ConfigError("say which jobs to retry", "give key prefixes from `lpfm jobs status`, or --failed")
    with _open_store(store_path) as store:
        chosen = store.retry(None if all_failed else list(keys))
    if keys and not chosen:
        raise ConfigError(f"no failed job matches {', '.join(keys)}", "see `lpfm jobs status`")
    console.print(f"queued {len(chosen)} failed job(s) again")


@jobs.command("watch")
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path))
@click.option("--qupath", "projects", multiple=True, type=click.Path(path_type=Path),
              help="Also watch this QuPath project for entries flagged with --flag-key (repeatable).")
@click.option("-p", "--prompt", default=None, help="What to do with new slides (and entries flagged 'true').")
@auto_option
@click.option("--out", default=None, help="Output folder (default: the output_dir setting; for QuPath, "
              "the project's lpfm-outputs/).")
@click.option("--every", type=float, default=300, show_default=True, help="Seconds between looks.")
@click.option("--once", is_flag=True, help="Look once, run what is queued, and exit (for cron/systemd timers).")
@click.option("--settle", "settle_s", type=float, default=30, show_default=True,
              help="A file is taken once its size has not changed for this many seconds.")
@click.option("--ext", "extensions", multiple=True, help="Extensions to take (default: whole-slide formats).")
@click.option("--recursive", is_flag=True, help="Also look in subfolders.")
@click.option("--flag-key", default="lpfm.enhance", show_default=True, help="QuPath metadata key to look for.")
@click.option("--omero", "watch_omero_server", is_flag=True,
              help="Also queue OMERO images tagged lpfm:<prompt> or with the pair lpfm.enhance = <prompt>.")
@click.option("--region", "region_text", default=None, help="x,y,width,height at the level (default: all).")
@name_option
@omero_options
@spec_options
@run_options
@store_option
@handle_errors
def watch(folders: tuple[Path, ...], projects: tuple[Path, ...], prompt: str | None, out: str | None, every: float,
          once: bool, settle_s: float, extensions: tuple[str, ...], recursive: bool, flag_key: str,
          watch_omero_server: bool, region_text: str | None, name: str | None, omero_host: str | None,
          omero_port: int | None,
          roi_classes: tuple[str, ...], output_mode: str, target_dataset: str | None, level: int,
          trust_pickle: bool, workers: int, dask_scheduler: str | None,
          slurm: bool, max_attempts: int, lease_s: float, store_path: Path, auto: bool = False, **opts: Any) -> None:
    """Find new slides in FOLDERS (flagged QuPath entries, tagged OMERO images), queue and run them; repeat."""
    import dataclasses
    import sys

    from lpfm_toolkit.jobs import SLIDE_EXTENSIONS, watch_folder, watch_qupath
    from lpfm_toolkit.sources import Region

    prompt = _auto_prompt(prompt, auto)
    if not folders and not projects and not watch_omero_server:
        raise ConfigError("nothing to watch", "give a FOLDER, --qupath PROJECT or --omero")
    if folders and not prompt:
        raise ConfigError("watching a folder needs --prompt", 'say what to do with new slides, e.g. -p "sr x2"')
    slurm_opts = {k: v for k, v in opts.items() if k.startswith("slurm_")}
    flags = {k: v for k, v in opts.items() if not k.startswith("slurm_")}
    region = Region.parse(region_text).as_tuple() if region_text else None
    template = _template(prompt or "", out, level, region, trust_pickle, flags, name)  # --name: files only
    qupath_template = dataclasses.replace(template, out=out or "")
    omero_settings = _omero_settings(omero_host, omero_port) if watch_omero_server else None
    omero_template = _omero_template(prompt or "", level, trust_pickle, flags, roi_classes, output_mode,
                                     target_dataset)
    failed = 0
    with _open_store(store_path, create=True) as store:
        while True:
            for folder in folders:
                report = watch_folder(store, folder, template, extensions=extensions or SLIDE_EXTENSIONS,
                                      recursive=recursive, settle_s=settle_s, wait=once)
                _report_added(report, store_path)
            for project in projects:
                _report_added(watch_qupath(store, project, qupath_template, prompt=prompt, flag_key=flag_key),
                              store_path)
            if omero_settings is not None:
                from lpfm_toolkit.integrations.omero.jobsource import watch_omero

                _report_added(watch_omero(store, omero_template, omero_settings), store_path)
            if store.counts()["queued"]:
                summary = _run(store, _runner(workers, dask_scheduler, slurm, slurm_opts), max_attempts, lease_s)
                console.print(_summary_line(summary))
                failed += summary.failed
            if once:
                break
            time.sleep(every)
    if failed:
        sys.exit(1)
