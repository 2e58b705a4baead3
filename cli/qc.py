"""``lpfm qc``: find what needs enhancing in slides, QuPath projects and OMERO images or datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lpfm_toolkit.cli.common import console, handle_errors, progress_bar
from lpfm_toolkit.errors import ConfigError


def _is_project(path: Path) -> bool:
    return path.suffix == ".qpproj" or (path.is_dir() and (path / "project.qpproj").is_file())


def _ranking(results: list[Any], title: str) -> Table:
    from lpfm_toolkit.qc import rank

    table = Table(title=title)
    for col in (
        "rank",
        "image",
        "tissue tiles",
        "flagged",
        "out of focus",
        "noisy",
        "compressed",
        "noise σ",
        "blur σ",
        "worst region (x,y,w,h)",
    ):
        table.add_column(col, justify="left" if col in ("image", "worst region (x,y,w,h)") else "right")
    for i, qc in enumerate(rank(results), 1):
        s = qc.summary()
        worst = s["worst_regions"][0] if s["worst_regions"] else None
        where = (
            f"{worst['x']},{worst['y']},{worst['width']},{worst['height']} ({', '.join(worst['defects'])})"
            if worst
            else "-"
        )

        def pct(v: float) -> str:
            return f"{100 * v:.1f} %"

        table.add_row(
            str(i),
            qc.name + (f" [{qc.source_id}]" if qc.source_id else ""),
            str(s["tissue_tiles"]),
            pct(s["flagged_fraction"]),
            pct(s["out_of_focus_fraction"]),
            pct(s["noisy_fraction"]),
            pct(s["compressed_fraction"]),
            "-" if s["median_noise_sigma"] is None else f"{s['median_noise_sigma']:.1f}",
            "-" if s["median_blur_sigma"] is None else f"{s['median_blur_sigma']:.2f}",
            where,
        )
    return table


@click.command()
@click.argument("targets", nargs=-1, type=click.Path(path_type=Path))
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to assess.")
@click.option("--region", "region_text", default=None, help="x,y,width,height in pixels of the level (default: all).")
@click.option("--tile", type=int, default=256, show_default=True, help="QC tile size in pixels of the level.")
@click.option(
    "--estimator",
    type=click.Choice(["auto", "classical", "learned"]),
    default="auto",
    show_default=True,
    help="auto: the default bundle's learned estimator when it loads, else classical.",
)
@click.option(
    "--out",
    default=None,
    help="Folder for the JSON/CSV/PNG reports (default: lpfm-qc/; for a QuPath project: <project>/lpfm-qc/).",
)
@click.option("--blur-threshold", type=float, default=None, help="Flag tiles whose blur σ (px) is above this (1.8).")
@click.option("--noise-threshold", type=float, default=None, help="Flag tiles whose noise σ (0–255) is above this (8).")
@click.option("--quality-threshold", type=float, default=None, help="Flag tiles whose JPEG quality is below this (60).")
@click.option("--mpp", type=float, default=None, help="Pixel size in µm for images that do not record it.")
@click.option("--images", "images", multiple=True, help="QuPath entries (ID or name) to check; default: all.")
@click.option("--remap", "remaps", multiple=True, help="QuPath: OLD=NEW for images that moved (repeatable).")
@click.option("--files-only", is_flag=True, help="QuPath: write the reports only, add no [lpfm qc] entries.")
@click.option("--omero-image", "omero_images", type=int, multiple=True, help="OMERO image id (repeatable).")
@click.option(
    "--omero-dataset",
    "omero_dataset",
    type=int,
    default=None,
    help="OMERO dataset id: every image, ranked, and a QC table on the dataset.",
)
@click.option("--host", default=None, help="OMERO server (or OMERO_HOST).")
@click.option("--port", type=int, default=None, help="OMERO port (default 4064).")
@click.option("--user", "-u", default=None, help="OMERO user; the password comes from OMERO_PASSWORD or a prompt.")
@click.option("--session-key", default=None, envvar="OMERO_SESSION_KEY", help="Join an existing OMERO session.")
@click.option("--group", "-g", default=None, help="OMERO group name or id.")
@click.option("--secure/--insecure", default=None, help="Encrypt the OMERO connection (default: secure).")
@click.option("--no-write", is_flag=True, help="OMERO: only the local reports, nothing written to the server.")
@click.option("--force", is_flag=True, help="Redo QC even if the same QC is already recorded.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-slide summaries as JSON.")
@handle_errors
def qc(
    targets: tuple[Path, ...],
    level: int,
    region_text: str | None,
    tile: int,
    estimator: str,
    out: str | None,
    blur_threshold: float | None,
    noise_threshold: float | None,
    quality_threshold: float | None,
    mpp: float | None,
    images: tuple[str, ...],
    remaps: tuple[str, ...],
    files_only: bool,
    omero_images: tuple[int, ...],
    omero_dataset: int | None,
    host: str | None,
    port: int | None,
    user: str | None,
    session_key: str | None,
    group: str | None,
    secure: bool | None,
    no_write: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Score blur, noise and JPEG compression per tile of slides, QuPath projects or OMERO images.

    TARGETS are slide files or QuPath projects (folder or project.qpproj). Writes per-tile JSON/CSV, a heat
    map PNG and a per-slide summary; ranks slides worst first. QuPath: flagged regions become annotations
    (lpfm: out of focus / noisy / compressed) with measurements, on a new "[lpfm qc]" entry. OMERO: ROIs and
    a map annotation on each image, and a QC table on the dataset.
    """
    from lpfm_toolkit.engine.estimate import Thresholds
    from lpfm_toolkit.sources import Region

    omero_mode = bool(omero_images or omero_dataset is not None)
    if not targets and not omero_mode:
        raise ConfigError("nothing to check", "give slide files or QuPath projects, or --omero-image/--omero-dataset")
    if targets and omero_mode:
        raise ConfigError("local targets and OMERO images in one run", "run lpfm qc once for each")
    for t in targets:
        if not t.exists():
            from lpfm_toolkit.errors import SlideNotFoundError

            raise SlideNotFoundError(f"{t} does not exist", "check the path")
    if tile < 32 or tile > 4096:
        raise ConfigError(f"--tile {tile} is out of range", "use 32 to 4096 (256 is the default)")
    if level < 0:
        raise ConfigError(f"--level {level} is negative", "levels count from 0 (full resolution)")
    d = Thresholds()
    thresholds = Thresholds(
        blur=blur_threshold if blur_threshold is not None else d.blur,
        noise=noise_threshold if noise_threshold is not None else d.noise,
        quality=quality_threshold if quality_threshold is not None else d.quality,
    )
    region = Region.parse(region_text) if region_text else None
    results: list[Any] = []
    if omero_mode:
        results = _run_omero(
            omero_images,
            omero_dataset,
            dict(host=host, port=port, user=user, session_key=session_key, group=group, secure=secure),
            level=level,
            region=region,
            tile=tile,
            estimator_name=estimator,
            thresholds=thresholds,
            out=out,
            write=not no_write,
            force=force,
        )
    else:
        from lpfm_toolkit.qc import get_estimator

        est = None
        for target in targets:
            if _is_project(target):
                results += _run_project(
                    target, images, remaps, level, region, tile, estimator, thresholds, out, files_only, force
                )
            else:
                est = est or get_estimator(estimator)
                results.append(_run_slide(target, level, region, tile, est, thresholds, out, mpp))
    _report(results, out, as_json)


def _report(results: list[Any], out: str | None, as_json: bool) -> None:
    from lpfm_toolkit.qc import rank, write_summary_csv

    if not results:
        return
    if len(results) > 1:
        path = write_summary_csv(results, Path(out or "lpfm-qc") / "qc-ranking.csv")
        console.print(f"ranking: {path}")
    if as_json:
        console.print_json(
            json.dumps([{"name": q.name, "uri": q.uri, "id": q.source_id, **q.summary()} for q in rank(results)])
        )
        return
    console.print(_ranking(results, "lpfm qc — worst first"))


def _run_slide(
    path: Path, level: int, region: Any, tile: int, est: Any, thresholds: Any, out: str | None, mpp: float | None
) -> Any:
    from lpfm_toolkit.qc import assess, write_outputs
    from lpfm_toolkit.sources import open_image

    with open_image(path, mpp=mpp) as handle:
        with progress_bar(f"qc · {handle.name}") as update:
            result = assess(
                handle, level=level, region=region, tile=tile, estimator=est, thresholds=thresholds, progress=update
            )
        files = write_outputs(result, handle, out or "lpfm-qc")
    console.print(f"{handle.name}: {files['json']}, {files['csv']}, {files['png']}")
    return result


def _run_project(
    path: Path,
    images: tuple[str, ...],
    remaps: tuple[str, ...],
    level: int,
    region: Any,
    tile: int,
    estimator: str,
    thresholds: Any,
    out: str | None,
    files_only: bool,
    force: bool,
) -> list[Any]:
    import contextlib

    from lpfm_toolkit.integrations.qupath import QuPathProject, parse_remaps
    from lpfm_toolkit.integrations.qupath.qc import qc_project
    from lpfm_toolkit.qc import get_estimator

    est = get_estimator(estimator)

    @contextlib.contextmanager
    def progress(entry: Any) -> Any:
        with progress_bar(f"qc · {entry.id}: {entry.name}") as update:
            yield update

    with QuPathProject.open(path, remaps=parse_remaps(remaps)) as project:
        outcomes = qc_project(
            project,
            images=list(images) or None,
            level=level,
            region=region,
            tile=tile,
            estimator=est,
            thresholds=thresholds,
            output_dir=out,
            write=not files_only,
            force=force,
            progress=progress,
        )
    for o in outcomes:
        if o.status == "failed":
            console.print(f"{o.entry.id}: {o.entry.name}: failed — {o.error}", style="red")
        elif o.status == "skipped":
            console.print(f"{o.entry.id}: {o.entry.name}: already checked → entry {o.qc_entry} (--force redoes it)")
        else:
            where = f" → entry {o.qc_entry}" if o.qc_entry else ""
            console.print(f"{o.entry.id}: {o.entry.name}: {o.files.get('json')}{where}")
    return [o.qc for o in outcomes if o.qc is not None]


def _run_omero(
    image_ids: tuple[int, ...],
    dataset_id: int | None,
    flags: dict[str, Any],
    *,
    level: int,
    region: Any,
    tile: int,
    estimator_name: str,
    thresholds: Any,
    out: str | None,
    write: bool,
    force: bool,
) -> list[Any]:
    import dataclasses
    import sys

    from lpfm_toolkit.config import load_settings
    from lpfm_toolkit.integrations.omero.qc import qc_omero
    from lpfm_toolkit.integrations.omero.session import OmeroSession, OmeroSettings, omero_modules
    from lpfm_toolkit.qc import get_estimator

    omero_modules()
    settings = OmeroSettings.resolve(settings=load_settings(), **flags)
    if settings.host and settings.user and not settings.password and not settings.session_key and sys.stdin.isatty():
        settings = dataclasses.replace(
            settings, password=click.prompt(f"OMERO password for {settings.user}", hide_input=True)
        )
    est = get_estimator(estimator_name)
    with OmeroSession(settings) as session, session.keepalive():

        def progress(label: str) -> Any:
            return progress_bar(f"qc · {label}")

        run = qc_omero(
            session,
            image_ids=image_ids,
            dataset_id=dataset_id,
            level=level,
            region=region,
            tile=tile,
            estimator=est,
            thresholds=thresholds,
            output_dir=out or "lpfm-qc",
            write=write,
            force=force,
            progress=progress,
        )
    for o in run.outcomes:
        line = f"image {o.image_id}: {o.status}" + (f" — {o.error}" if o.error else "")
        console.print(line, style="red" if o.status == "failed" else None)
    if run.table_file_id is not None:
        console.print(f"QC table on dataset {dataset_id}: OMERO file {run.table_file_id}")
    return [o.qc for o in run.outcomes if o.qc is not None]


def run_auto(
    slide: Path,
    *,
    level: int,
    region_text: str | None,
    out: str | None,
    options: Any,
    settings: Any,
    force: bool,
    mpp: float | None = None,
    name: str | None = None,
) -> Any:
    """``lpfm enhance --auto``: QC the region, enhance the flagged tiles with their tasks, print before/after.

    ``options``: the :class:`~lpfm_toolkit.options.EngineOptions` of ``lpfm enhance``; ``settings``: seed, tiling
    and output settings; ``name``: the file name template (``--name``). Everything that needs no model is checked
    before one loads.
    """
    from lpfm_toolkit.cli.local import check_name, check_out, report
    from lpfm_toolkit.config import check_mpp
    from lpfm_toolkit.errors import ConfigError
    from lpfm_toolkit.prompts import Task, TaskKind
    from lpfm_toolkit.qc import auto_enhance, check_auto_options, engine_factory, get_estimator
    from lpfm_toolkit.sinks.ometiff import OmeTiffSink
    from lpfm_toolkit.sources import Region, open_image

    check_mpp(mpp)
    region = Region.parse(region_text) if region_text else None
    check_auto_options(options)
    check_name(name)
    target, is_file = check_out(out or settings.output_dir, Task(TaskKind.RESTORE), force, False)
    if is_file and name is not None:
        raise ConfigError(f"--name and --out {target.name} both name the file", "give --out a folder, or drop --name")
    with open_image(slide, mpp=mpp) as handle:
        # every task --auto may choose, checked against the engine options before any model loads
        build = engine_factory(options, handle.channel_names)
        if is_file:
            sink = OmeTiffSink(path=target, compression=settings.compression, tile=settings.tiff_tile, overwrite=force)
        else:
            sink = OmeTiffSink(target, compression=settings.compression, tile=settings.tiff_tile, name=name)
        estimator = get_estimator("auto", brightfield=handle.is_rgb)
        with progress_bar(f"qc · {handle.name}") as qc_update, progress_bar(f"auto · {handle.name}") as update:
            res = auto_enhance(
                handle,
                sink,
                build,
                level=level,
                region=region,
                seed=settings.seed,
                estimator=estimator,
                tile_size=settings.tile_size,
                overlap=settings.overlap,
                force=force,
                qc_progress=qc_update,
                progress=update,
            )
    _auto_report(res.report)
    if res.result is None:
        console.print("nothing flagged: no output written (the region needs no enhancement)")
    else:
        report(res.result)
    return res


def _auto_report(report: dict[str, Any], what: str = "lpfm enhance --auto") -> None:
    def fmt(e: dict[str, Any] | None, key: str, digits: int = 1) -> str:
        if not e or e.get(key) is None:
            return "-"
        return f"{e[key]:.{digits}f}"

    table = Table(title=f"{what}: {report['flagged_tiles']} of {report['tiles']} tiles enhanced")
    for col in (
        "region (x,y,w,h)",
        "task",
        "tiles",
        "blur σ before → after",
        "noise σ before → after",
        "still flagged",
    ):
        table.add_column(col, justify="left" if col.startswith(("region", "task")) else "right")
    rows = [
        *report["regions"],
        {
            "bounds": None,
            "task": "all",
            **{k: report[k] for k in ("before", "after")},
            "tiles": report["flagged_tiles"],
            "still_flagged": report["still_flagged"],
        },
    ]
    for r in rows:
        where = ",".join(map(str, r["bounds"])) if r["bounds"] else "whole region"
        table.add_row(
            where,
            r["task"],
            str(r["tiles"]),
            f"{fmt(r['before'], 'blur_sigma', 2)} → {fmt(r['after'], 'blur_sigma', 2)}",
            f"{fmt(r['before'], 'noise_sigma')} → {fmt(r['after'], 'noise_sigma')}",
            str(r["still_flagged"]),
        )
    console.print(table)


def check_auto_prompt(prompt: str | None, auto: bool) -> None:
    """One line when ``-p`` and ``--auto`` are both given, or neither."""
    if auto and prompt is not None:
        raise ConfigError("give -p PROMPT or --auto, not both", "--auto lets QC choose each region's task")
    if not auto and prompt is None:
        raise ConfigError("no prompt given", 'give -p PROMPT (e.g. -p "sr x2", -p denoise) or --auto')


def report_auto_outcomes(outcomes: list[Any]) -> None:
    """The before/after table of each item of a batch that ran (or found) an ``--auto`` result."""
    for o in outcomes:
        report = o.detail.get("qc")
        if report and report.get("flagged_tiles"):
            _auto_report(report, o.item)


def run_qupath_auto(
    project: Path,
    *,
    images: tuple[str, ...],
    classes: tuple[str, ...],
    annotation_refs: tuple[str, ...],
    level: int,
    output_dir: Path | None,
    backend: str,
    remaps: tuple[str, ...],
    annotations: Path | None,
    force: bool,
    flags: dict[str, Any],
) -> None:
    """``lpfm qupath enhance PROJECT --auto``: QC each selected entry (or annotation), enhance what it flags."""
    from lpfm_toolkit.cli.batch import batch_progress, report_batch
    from lpfm_toolkit.cli.options import options_from_flags
    from lpfm_toolkit.cli.qupath import _channels, _open, _select
    from lpfm_toolkit.integrations.qupath.qc import auto_enhance_project
    from lpfm_toolkit.qc import check_auto_options, resolve_auto_options

    options, settings = options_from_flags(flags)
    check_auto_options(options)
    with _open(project, backend, remaps, annotations) as proj:
        items = _select(proj, images, classes, annotation_refs, level, annotations)
        channels = _channels(proj, items)
        if channels is not None:  # every task's options, checked on the first image before any model loads
            resolve_auto_options(options, channels)
        with batch_progress("lpfm qupath enhance · auto") as progress:
            outcomes = auto_enhance_project(
                proj,
                options,
                items=items,
                seed=settings.seed,
                output_dir=output_dir,
                tile_size=settings.tile_size,
                overlap=settings.overlap,
                compression=settings.compression,
                tiff_tile=settings.tiff_tile,
                force=force,
                progress=progress,
            )
    report_auto_outcomes(outcomes)
    report_batch(outcomes, "lpfm qupath enhance · auto")
