"""``lpfm qupath``: list a QuPath project, enhance its images or annotated regions into new entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from lpfm_toolkit.cli.batch import batch_progress, report_batch
from lpfm_toolkit.cli.common import console, handle_errors
from lpfm_toolkit.cli.local import check_name, check_out_folder, name_option
from lpfm_toolkit.cli.options import engine_flags, options_from_flags


def project_options(func: Any) -> Any:
    """Options shared by the commands that open a project."""
    opts = [
        click.option(
            "--backend",
            type=click.Choice(["auto", "file", "paquo"]),
            default="auto",
            show_default=True,
            help="paquo needs a QuPath installation; file reads the project JSON directly.",
        ),
        click.option(
            "--remap",
            "remaps",
            multiple=True,
            metavar="OLD=NEW",
            help="Images moved: replace the path prefix OLD by NEW (repeatable).",
        ),
        click.option(
            "--annotations",
            "annotations",
            type=click.Path(path_type=Path),
            default=None,
            help="GeoJSON for the one selected image, or a folder of <entryID>.geojson files "
            "(default: the project's annotations/ folder).",
        ),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _open(
    project: Path, backend: str, remaps: tuple[str, ...], annotations: Path | None, readonly: bool = False
) -> Any:
    from lpfm_toolkit.integrations.qupath import QuPathProject, parse_remaps

    return QuPathProject.open(project, backend, remaps=parse_remaps(remaps), annotations=annotations, readonly=readonly)


@click.group()
def qupath() -> None:
    """Run lpfm over QuPath projects; results become new entries (originals are never changed)."""


@qupath.command("list")
@click.argument("project", type=click.Path(path_type=Path))
@project_options
@handle_errors
def list_entries(project: Path, backend: str, remaps: tuple[str, ...], annotations: Path | None) -> None:
    """List the entries of PROJECT: size, levels, pixel size, annotations by class, image file found or not."""
    with _open(project, backend, remaps, annotations, readonly=True) as proj:
        table = Table(title=Text(f"{proj.path}  (QuPath {proj.version or '?'}, {proj.backend} backend)"))
        for col, justify in (
            ("ID", "right"),
            ("image", "left"),
            ("size", "right"),
            ("levels", "right"),
            ("µm/px", "right"),
            ("annotations", "left"),
            ("image file", "left"),
            ("lpfm", "left"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for e in proj.entries:
            size = f"{e.width}×{e.height}" if e.width and e.height else "?"
            mpp = f"{e.mpp[0]:.4g}" if e.mpp else "–"
            counts = proj.annotation_counts(e)
            ann = (
                ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                if counts
                else ("none" if counts == {} else "unknown")
            )
            res = proj.resolution(e)
            where = "MISSING" if res.path is None else ("found" if res.how == "stored" else f"found ({res.how})")
            lpfm = f"from {e.metadata.get('lpfm.source.entry')}" if e.is_result else ""
            table.add_row(e.id, Text(e.name), size, str(len(e.levels) or "?"), mpp, Text(ann), Text(where), lpfm)
        console.print(table)


@qupath.command("enhance")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", default=None, help='What to do, e.g. "sr x2", "denoise" (or --auto).')
@click.option("--auto", is_flag=True, help="Enhance only what lpfm qc flags, each region with its task (docs/qc.md).")
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="NAME|ID",
    help="Entry to process (repeatable; default: every entry that is not an lpfm result).",
)
@click.option(
    "--class",
    "classes",
    multiple=True,
    metavar="NAME",
    help="Process each annotation of this class (repeatable) instead of whole images.",
)
@click.option(
    "--annotation",
    "annotation_refs",
    multiple=True,
    metavar="NAME|ID",
    help="Process the annotation with this name or id (repeatable).",
)
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to read.")
@click.option(
    "--out",
    "output_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for the OME-TIFFs (default: <project>/lpfm-outputs).",
)
@name_option
@project_options
@engine_flags
@handle_errors
def enhance(
    project: Path,
    prompt: str,
    images: tuple[str, ...],
    classes: tuple[str, ...],
    annotation_refs: tuple[str, ...],
    level: int,
    output_dir: Path | None,
    name: str | None,
    backend: str,
    remaps: tuple[str, ...],
    annotations: Path | None,
    force: bool,
    auto: bool = False,
    **flags: Any,
) -> None:
    """Enhance images of PROJECT (or their annotated regions) by PROMPT; each result is a new entry."""
    from lpfm_toolkit.cli.qc import check_auto_prompt, run_qupath_auto

    check_auto_prompt(prompt, auto)
    if auto:  # QC picks the regions and their tasks (lpfm_toolkit.integrations.qupath.qc.auto_enhance_project)
        run_qupath_auto(
            project,
            images=images,
            classes=classes,
            annotation_refs=annotation_refs,
            level=level,
            output_dir=output_dir,
            backend=backend,
            remaps=remaps,
            annotations=annotations,
            force=force,
            flags=flags,
        )
        return
    from lpfm_toolkit.integrations.qupath import enhance_project
    from lpfm_toolkit.options import build_engine
    from lpfm_toolkit.prompts import parse_prompt

    task = parse_prompt(prompt)
    options, settings = options_from_flags(flags)
    check_out_folder(output_dir)
    check_name(name)
    with _open(project, backend, remaps, annotations) as proj:
        items = _select(proj, images, classes, annotation_refs, level, annotations)
        channels = _channels(proj, items)
        if channels is not None:  # checked on the first image that opens; the others are checked as they run
            options = options.resolved(task, channels)
        engine = build_engine(options, task)  # the model loads only now, after every cheap check
        with batch_progress(f"lpfm qupath enhance · {task.label}") as progress:
            outcomes = enhance_project(
                proj,
                task,
                engine,
                items=items,
                seed=settings.seed,
                output_dir=output_dir,
                tile_size=settings.tile_size,
                overlap=settings.overlap,
                compression=settings.compression,
                tiff_tile=settings.tiff_tile,
                force=force,
                samples_uncertainty=options.samples > 1,
                progress=progress,
                name=name,
            )
    report_batch(outcomes, f"lpfm qupath enhance · {prompt}")


def _select(
    proj: Any,
    images: tuple[str, ...],
    classes: tuple[str, ...],
    annotation_refs: tuple[str, ...],
    level: int,
    annotations: Path | None,
) -> list[Any]:
    """The items ``lpfm qupath enhance`` (with or without ``--auto``) runs: entries or their annotations."""
    from lpfm_toolkit.errors import ConfigError
    from lpfm_toolkit.integrations.qupath import select_items

    if annotations is not None and annotations.is_file() and len(proj.select(images)) != 1:
        raise ConfigError(
            f"--annotations {annotations} is one file but {len(proj.select(images))} entries are selected",
            "select one entry with --image, or give a folder of <entryID>.geojson",
        )
    return select_items(
        proj, images=images or None, classes=classes or None, annotation_refs=annotation_refs or None, level=level
    )


def _channels(project: Any, items: list[Any]) -> list[str] | None:
    """The channel names of the first entry to be enhanced, or None when it does not open (its items fail)."""
    from lpfm_toolkit.errors import LpfmError

    entry = next((i.entry for i in items if not i.nothing), None)
    if entry is None:
        return None
    try:
        with project.open_entry(entry) as handle:
            return list(handle.channel_names)
    except (LpfmError, OSError):
        return None
