"""Commands over local slides: info, enhance, demo, provenance show, reproduce."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lpfm_toolkit.cli.batch import batch_progress
from lpfm_toolkit.cli.common import console, err_console, fail, handle_errors, levels_table, progress_bar
from lpfm_toolkit.cli.options import engine_flags, options_from_flags
from lpfm_toolkit.errors import SlideNotFoundError

SAMPLE = Path(__file__).resolve().parents[1] / "lpfm_toolkit" / "data" / "cmu_small_region.svs"
DEMO_REGION = "900,1200,512,512"


def sample_slide_path() -> Path:
    """The bundled CC0 sample slide, wherever the package is installed."""
    from importlib import resources

    path = Path(str(resources.files("lpfm_toolkit") / "data" / "cmu_small_region.svs"))
    if not path.exists():
        raise SlideNotFoundError("the bundled sample slide is missing", "reinstall lpfm-toolkit")
    return path


FILE_SUFFIXES = (".ome.tiff", ".ome.tif")
#: ``--out`` names that are files, not folders (lpfm writes only OME-TIFF)
_FILE_LIKE = (".tif", ".tiff", ".btf", ".png", ".jpg", ".jpeg", ".svs")
NAME_HELP = (
    "Output file name template: {stem} {task} {prompt} {engine} {method} {region} {level} {key}; [...] is left out "
    "when a placeholder in it is empty (default: {stem}_{task}_{engine}[_{region}].{key})."
)


def name_option(func: Any) -> Any:
    """``--name TEMPLATE``: how output files are named (:class:`~lpfm_toolkit.sinks.ometiff.NameTemplate`)."""
    return click.option("--name", "name", default=None, metavar="TEMPLATE", help=NAME_HELP)(func)


def check_name(name: str | None) -> str | None:
    """``--name`` checked before anything runs (one ``error:`` line for a bad template); returns it."""
    if name is not None:
        from lpfm_toolkit.sinks.ometiff import NameTemplate

        NameTemplate(name)
    return name


def check_out_folder(out: str | Path | None) -> None:
    """Refuse an ``--out`` that names a file where a folder is wanted (``--out x.tif`` would make a folder)."""
    from lpfm_toolkit.errors import OutputExistsError

    if not out:
        return
    path = Path(out).expanduser()
    if not path.is_dir() and path.name.lower().endswith(FILE_SUFFIXES + _FILE_LIKE):
        raise OutputExistsError(
            f"--out {path.name} looks like a file name, but this command writes one OME-TIFF per result into a folder",
            "give a folder with --out, and name the files with --name",
        )


def check_out(out: str, task: Any, force: bool, uncertainty: bool) -> tuple[Path, bool]:
    """``(path, is_file)`` for ``--out``; refuses, before any work, a target that is not ours or not writable."""
    from lpfm_toolkit.errors import OutputExistsError
    from lpfm_toolkit.verify import check_target, require_writable_folder

    path = Path(out).expanduser()
    if path.name.lower().endswith(FILE_SUFFIXES):
        check_target(path, force=force, uncertainty=uncertainty)
        return path, True
    if path.suffix.lower() in _FILE_LIKE and not path.is_dir():
        stem = path.name[: -len(path.suffix)]
        raise OutputExistsError(
            f"--out {path.name} looks like a file name, but lpfm writes pyramidal OME-TIFF with its provenance",
            f"name the file {stem}.ome.tiff, or give a folder",
        )
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"--out {path} is a file, not a folder", "give a folder, or a name ending .ome.tiff")
    require_writable_folder(path)
    return path, False


def run_local(
    slide: Path,
    prompt: str,
    level: int,
    region_text: str | None,
    out: str | None,
    options: Any,
    settings: Any,
    force: bool,
    mpp: float | None = None,
    preview: str | None = None,
    verify: bool = False,
    progress: Any = None,
    name: str | None = None,
) -> Any:
    """Check everything that needs no model, then load the engine and run one enhancement.

    ``options``: the :class:`~lpfm_toolkit.options.EngineOptions`; ``settings``: seed, tiling and output settings;
    ``progress(done, total)``: the tiles; ``name``: the output file name template (``--name``).
    """
    from lpfm_toolkit.config import check_mpp
    from lpfm_toolkit.options import build_engine as build
    from lpfm_toolkit.pipeline import plan, run_item
    from lpfm_toolkit.prompts import parse_prompt
    from lpfm_toolkit.sinks.ometiff import OmeTiffSink
    from lpfm_toolkit.sources import Region, open_image

    check_mpp(mpp)
    task = parse_prompt(prompt)
    region = Region.parse(region_text) if region_text else None
    uncertainty = options.samples > 1
    target, is_file = check_out(out or settings.output_dir, task, force, uncertainty)
    check_name(name)
    if name is not None and is_file:
        from lpfm_toolkit.errors import ConfigError

        raise ConfigError(f"--name and --out {target.name} both name the file", "give --out a folder, or drop --name")
    if preview:
        from lpfm_toolkit.preview import is_preview
        from lpfm_toolkit.verify import check_writable_file

        check_writable_file(Path(preview).expanduser(), "--preview", marker=is_preview)
    with open_image(slide, mpp=mpp) as handle:
        item = plan(handle, task, level=level, region=region, seed=settings.seed)[0]
        options = options.resolved(task, handle.channel_names)
        if is_file:
            sink = OmeTiffSink(path=target, compression=settings.compression, tile=settings.tiff_tile, overwrite=force)
        else:
            sink = OmeTiffSink(target, compression=settings.compression, tile=settings.tiff_tile, name=name)
        from lpfm_toolkit.jobs.scratch import clean_scratch

        for left in clean_scratch(target.parent if is_file else target):  # a killed earlier run's leftovers
            console.print(f"removed {left.name}, left behind by an interrupted run", style="yellow")
        engine = build(options, task)  # the model loads only now, after every cheap check
        result = run_item(
            handle,
            item,
            engine,
            sink,
            tile_size=settings.tile_size,
            overlap=settings.overlap,
            force=force,
            samples_uncertainty=uncertainty,
            progress=progress,
            verify="full" if verify else "quick",
        )
        if preview:
            from lpfm_toolkit.preview import write_preview

            png = write_preview(
                handle, item, result.output.uri, preview, uncertainty=result.output.extra.get("uncertainty")
            )
            result.output.extra["preview"] = str(png)
        return result


def run_and_report(slide: Path, prompt: str, **kwargs: Any) -> None:
    """:func:`run_local` as a batch of one (the shared progress display and exit code), then :func:`report`.

    Errors are not caught: with a single item, a problem is the command's error (one line, its exit code).
    """
    from lpfm_toolkit.batch import Outcome, Status, exit_code, run_items

    def run_one(path: Path, tiles: Any) -> Outcome:
        result = run_local(path, prompt, progress=tiles, **kwargs)
        report(result)
        return Outcome(path.name, Status.SKIPPED if result.skipped else Status.DONE, result=result.output.uri)

    with batch_progress(f"lpfm enhance · {prompt}") as progress:
        outcomes = run_items([slide], run_one, label=lambda p: p.name, progress=progress, catch=())
    code = exit_code(outcomes)
    if code:
        sys.exit(code)


def report(result: Any) -> None:
    out = result.output
    prov = result.provenance
    if result.skipped:
        console.print(
            f"already done: {out.uri} (same source, region, task, model and seed, and the file checks "
            "out; --force redoes it)"
        )
        return
    if result.remade:
        console.print(f"the earlier result was damaged ({result.remade}); made it again", style="yellow")
    shape = prov.output.get("shape", [])
    mpp = prov.output.get("mpp")
    levels = prov.output.get("levels") or []
    mpp_text = f", {mpp[0]:.4g} µm/px" if mpp else ""
    console.print(
        f"wrote {out.uri}  ({shape[1]}×{shape[0]}, {len(levels)} levels{mpp_text}, "
        f"{prov.durations.get('total_s', 0):.1f} s)"
    )
    console.print(f"provenance: {out.extra.get('sidecar')}")
    if out.extra.get("uncertainty"):
        console.print(f"uncertainty: {out.extra['uncertainty']}")
    if out.extra.get("preview"):
        console.print(f"before/after: {out.extra['preview']}")


@click.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None, help="Pixel size in µm for images that do not record it (PNG/JPEG).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def info(slide: Path, mpp: float | None, as_json: bool) -> None:
    """Show levels, pixel size and channels of SLIDE."""
    from lpfm_toolkit.sources import open_image

    with open_image(slide, mpp=mpp) as handle:
        desc = handle.describe()
    if as_json:
        console.print_json(json.dumps(desc))
        return
    vendor = f" · {desc['vendor']}" if desc.get("vendor") else ""
    table = levels_table(desc, f"{desc['name']}  ({desc.get('reader', desc['system'])}{vendor})")
    console.print(table)
    console.print(f"channels: {', '.join(desc['channels'])}   dtype: {desc['dtype']}")


@click.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", default=None, help='What to do, e.g. "sr x2", "denoise", "AF -> H&E" (or --auto).')
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to read.")
@click.option("--region", "region_text", default=None, help="x,y,width,height in pixels of the level (default: all).")
@click.option("--out", default=None, help="Output folder, or a file name ending in .ome.tiff (default: lpfm-out/).")
@name_option
@click.option("--mpp", type=float, default=None, help="Pixel size in µm for images that do not record it.")
@click.option("--preview", default=None, help="Also write a before/after PNG of the centre of the region here.")
@click.option(
    "--verify",
    "verify",
    is_flag=True,
    help="Before reusing an earlier result, decode all of it against its checksums (default: header only).",
)
@click.option("--auto", is_flag=True, help="Enhance only the regions lpfm qc flags, each with its task (docs/qc.md).")
@engine_flags
@handle_errors
def enhance(
    slide: Path,
    prompt: str | None,
    level: int,
    region_text: str | None,
    out: str | None,
    name: str | None,
    mpp: float | None,
    preview: str | None,
    verify: bool,
    auto: bool,
    force: bool,
    **flags: Any,
) -> None:
    """Enhance or virtually stain SLIDE by PROMPT into a new pyramidal OME-TIFF (the original is untouched)."""
    options, settings = options_from_flags(flags)
    common = dict(level=level, region_text=region_text, out=out, options=options, settings=settings, force=force)
    if auto or prompt is None:  # --auto: lpfm qc picks the regions and their tasks (lpfm_toolkit.qc.auto_enhance)
        from lpfm_toolkit.cli.qc import run_auto
        from lpfm_toolkit.errors import ConfigError

        if not auto or prompt is not None or preview:
            what = (
                "no prompt given"
                if prompt is None and not auto
                else "give -p PROMPT or --auto, not both"
                if prompt is not None
                else "--preview is not available with --auto"
            )
            raise ConfigError(what, 'e.g. -p "sr x2", -p denoise, or --auto without -p and --preview')
        run_auto(slide, mpp=mpp, name=name, **common)
        return
    run_and_report(slide, prompt, mpp=mpp, preview=preview, verify=verify, name=name, **common)


@click.command()
@click.option("-p", "--prompt", default="sr x2", show_default=True)
@click.option("--region", "region_text", default=DEMO_REGION, show_default=True)
@click.option("--out", default=None, help="Output folder (default: lpfm-out/).")
@engine_flags
@handle_errors
def demo(prompt: str, region_text: str, out: str | None, force: bool, **flags: Any) -> None:
    """Enhance a region of the bundled CC0 sample slide (CMU-1 cut, Aperio SVS) and say where it went."""
    options, settings = options_from_flags(flags)
    slide = sample_slide_path()
    out = out or settings.output_dir
    console.print(f"sample slide: {slide.name} (CC0, OpenSlide CMU-1 cut), region {region_text}, prompt {prompt!r}")
    preview = str(Path(out) / "demo-before-after.png")
    run_and_report(
        slide,
        prompt,
        level=0,
        region_text=region_text,
        out=out,
        options=options,
        settings=settings,
        force=force,
        preview=preview,
    )
    from lpfm_toolkit.demo import DEMO_DEGRADATIONS, gain_demo

    if prompt.strip().lower() in DEMO_DEGRADATIONS:  # the gain: a clean held-out crop degraded, then restored
        from lpfm_toolkit.options import build_engine as build
        from lpfm_toolkit.prompts import parse_prompt

        task = parse_prompt(prompt)
        resolved = options.resolved(task, ["R", "G", "B"])
        if resolved.engine == "lpfm":  # the gain of the learned engine over the classical methods
            for line in gain_demo(out, build(resolved, task), prompt=prompt).lines():
                console.print(line)


@click.group()
def provenance() -> None:
    """Read the provenance of an lpfm output."""


@provenance.command("show")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full JSON record.")
@handle_errors
def provenance_show(output: Path, as_json: bool) -> None:
    """Print the provenance of OUTPUT (an .ome.tiff, or its .lpfm.json sidecar); exit 1 if its two copies disagree."""
    from lpfm_toolkit.verify import read_output

    rec = read_output(output)
    prov = rec.provenance
    if as_json:
        console.print_json(prov.to_json())
    else:
        table = Table(title=f"provenance of {output.name}", show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value", overflow="fold")
        for k, v in prov.summary().items():
            table.add_row(k, v)
        table.add_row("lpfm.durations", ", ".join(f"{k}={v}" for k, v in prov.durations.items()))
        table.add_row(
            "lpfm.read_from",
            "sidecar and OME-XML"
            if rec.sidecar and rec.embedded
            else "sidecar only (no image beside it)"
            if rec.sidecar
            else "OME-XML only (sidecar missing)",
        )
        console.print(table)
    if rec.differences:
        err_console.print(
            f"warning: the sidecar and the provenance inside {rec.tiff.name} disagree on "
            f"{', '.join(rec.differences)}; one was edited (shown: the sidecar)",
            style="bold red",
            markup=False,
        )
        sys.exit(1)


@click.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Header, levels, size and provenance only; do not decode the pixels.")
@handle_errors
def verify(output: Path, quick: bool) -> None:
    """Check OUTPUT (an output, or every output in a folder): decode every level against its checksums and
    compare the sidecar with the embedded provenance; exit 1 if anything is damaged."""
    from lpfm_toolkit.verify import check_output, outputs_in, read_output

    fix = "run the same `lpfm enhance` command with --verify to make it again"
    if output.is_dir():
        found = outputs_in(output)
        if not found:
            fail(f"{output} holds no lpfm outputs", "give an output (.ome.tiff) or a folder of them")
        damaged = 0
        for tiff in found:
            problems = check_output(tiff, full=not quick)
            damaged += bool(problems)
            line = f"damaged: {tiff}: {'; '.join(problems)}" if problems else f"ok: {tiff}"
            console.print(line, style="bold red" if problems else None, markup=False)
        console.print(f"{len(found) - damaged} ok, {damaged} damaged")
        if damaged:
            fail(f"{damaged} of {len(found)} outputs in {output} are damaged", fix, 1)
        return
    rec = read_output(output)  # unreadable records and foreign files: one line, exit 2
    problems = check_output(rec.tiff, full=not quick)
    if problems:
        fail(f"{rec.tiff.name} is damaged: {'; '.join(problems)}", fix, 1)
    levels = len(rec.provenance.stored.get("levels") or rec.provenance.output.get("levels") or [])
    how = "header, levels, size and provenance" if quick else f"{levels} levels decoded, checksums match"
    console.print(f"ok: {rec.tiff} ({how}; sidecar and embedded provenance agree)")


@click.command()
@click.argument("output")
@click.option("--model", default=None, help="The bundle folder the output was made with, if it has moved.")
@click.option("--trust-pickle", is_flag=True)
@handle_errors
def reproduce(output: str, model: str | None, trust_pickle: bool) -> None:
    """Check OUTPUT's stored pixels, re-run it from its provenance and compare the pixels (exit 1 if anything differs).

    OUTPUT is an lpfm output file (also one added to a QuPath project), or an OMERO result as
    omero://HOST/image/ID, read with OMERO_SESSION_KEY (or OMERO_USER and OMERO_PASSWORD) from the environment;
    `lpfm omero reproduce ID` takes the usual OMERO login options.
    """
    from lpfm_toolkit.verify import is_omero_uri
    from lpfm_toolkit.verify import reproduce as reproduce_output

    target: str | Path = output if is_omero_uri(output) else Path(output)
    label = output if isinstance(target, str) else target.name
    with progress_bar(f"reproducing {label}") as update:
        rep = reproduce_output(target, model=model, trust_pickle=trust_pickle, progress=update)
    print_reproduce_report(rep)


def print_reproduce_report(rep: Any) -> None:
    """The lines of a :class:`~lpfm_toolkit.verify.ReproduceReport`; exit 1 unless the pixels are identical."""
    for note in rep.notes:
        console.print(f"warning: {note}", style="yellow")
    for problem in rep.file_problems:
        err_console.print(f"{rep.kind} damaged: {problem}", style="bold red", markup=False)
    console.print(f"recorded output sha256 {rep.recorded_sha256}")
    console.print(f"reproduced          {rep.reproduced_sha256}")
    same = rep.recorded_sha256 == rep.reproduced_sha256
    console.print("identical pixels" if same else "pixels DIFFER", style="green" if same else "bold red")
    if not rep.identical:
        sys.exit(1)
