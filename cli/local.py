"""Commands over local slides: info, enhance, demo, provenance show, reproduce."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lpfm_toolkit.cli.common import console, err_console, fail, handle_errors, levels_table, progress_bar
from lpfm_toolkit.config import load_settings
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


def engine_option_list(engine_help: str = "auto: the default model bundle if installed, else classical.") -> list[Any]:
    """The click options that choose and tune an engine (shared with `lpfm jobs add`)."""
    return [
        click.option(
            "--engine", type=click.Choice(["auto", "lpfm", "classical", "identity"]), default=None, help=engine_help
        ),
        click.option(
            "--method",
            default=None,
            help="Classical method (bicubic, lanczos, richardson_lucy, wiener, "
            "nlm, tv, wavelet, macenko, beer_lambert).",
        ),
        click.option("--model", default=None, help="Model bundle name or folder (engine lpfm)."),
        click.option("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)."),
        click.option("--steps", type=int, default=None, help="Diffusion steps (0: restorer only)."),
        click.option(
            "--samples",
            type=int,
            default=None,
            help="Stochastic samples per tile; >1 writes their mean and a per-pixel uncertainty map (the lpfm engine then refines with the bundle's default steps unless --steps is given).",
        ),
        click.option(
            "--trust-pickle", is_flag=True, help="Allow pickled (.pt/.ckpt) weights. Only for files you trust."
        ),
        click.option("--seed", type=int, default=None, help="Global seed (per-tile seeds derive from it)."),
        click.option("--tile", "tile_size", type=int, default=None, help="Tile size in input pixels (default 256)."),
        click.option("--overlap", type=int, default=None, help="Tile overlap in input pixels (default 32)."),
        click.option(
            "--compression",
            type=click.Choice(["auto", "jpeg", "zlib", "zstd", "lzw", "none"]),
            default=None,
            help="auto: JPEG for 8-bit RGB, zlib otherwise.",
        ),
        click.option(
            "--tiff-tile",
            type=click.Choice(["256", "512"]),
            default=None,
            help="Tile size of the output OME-TIFF (default 512).",
        ),
    ]


def engine_options(func: Any) -> Any:
    """Options shared by every command that runs an engine, and ``--force``."""
    opts = [
        *engine_option_list(),
        click.option("--force", is_flag=True, help="Redo work even if an identical result exists."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def build_engine(settings: Any, trust_pickle: bool = False) -> Any:
    from lpfm_toolkit.engine import get_engine

    return get_engine(
        settings.engine,
        method=settings.method,
        model=settings.model,
        device=settings.device,
        steps=settings.steps,
        samples=settings.samples,
        trust_pickle=trust_pickle,
    )


def settings_from_flags(**flags: Any) -> Any:
    return load_settings().replace(**flags)


FILE_SUFFIXES = (".ome.tiff", ".ome.tif")


def check_out(out: str, task: Any, force: bool, uncertainty: bool) -> tuple[Path, bool]:
    """``(path, is_file)`` for ``--out``; refuses, before any work, a target that is not ours or not writable."""
    from lpfm_toolkit.errors import OutputExistsError
    from lpfm_toolkit.verify import check_target, require_writable_folder

    path = Path(out).expanduser()
    if path.name.lower().endswith(FILE_SUFFIXES):
        check_target(path, force=force, uncertainty=uncertainty)
        return path, True
    if path.suffix.lower() in (".tif", ".tiff", ".btf", ".png", ".jpg", ".jpeg", ".svs"):
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
    settings: Any,
    force: bool,
    trust_pickle: bool,
    mpp: float | None = None,
    preview: str | None = None,
    verify: bool = False,
) -> Any:
    """Check everything that needs no model, then load the engine and run one enhancement with a progress bar."""
    from lpfm_toolkit.config import check_mpp
    from lpfm_toolkit.pipeline import plan, preflight_engine, run_item
    from lpfm_toolkit.prompts import parse_prompt
    from lpfm_toolkit.sinks.ometiff import OmeTiffSink
    from lpfm_toolkit.sources import Region, open_image

    check_mpp(mpp)
    task = parse_prompt(prompt)
    region = Region.parse(region_text) if region_text else None
    uncertainty = settings.samples > 1
    target, is_file = check_out(out or settings.output_dir, task, force, uncertainty)
    if preview:
        from lpfm_toolkit.preview import is_preview
        from lpfm_toolkit.verify import check_writable_file

        check_writable_file(Path(preview).expanduser(), "--preview", marker=is_preview)
    with open_image(slide, mpp=mpp) as handle:
        item = plan(handle, task, level=level, region=region, seed=settings.seed)[0]
        explicit = {k for k, v in settings.origin.items() if v == "flag"}
        settings.engine = preflight_engine(
            settings.engine,
            task,
            handle.channel_names,
            method=settings.method,
            model=settings.model,
            steps=settings.steps,
            samples=settings.samples,
            explicit=explicit,
        )
        if settings.engine != "classical":
            settings.method = None  # a classical method from a settings file does not apply
        if is_file:
            sink = OmeTiffSink(path=target, compression=settings.compression, tile=settings.tiff_tile, overwrite=force)
        else:
            sink = OmeTiffSink(target, compression=settings.compression, tile=settings.tiff_tile)
        from lpfm_toolkit.jobs.scratch import clean_scratch

        for left in clean_scratch(target.parent if is_file else target):  # a killed earlier run's leftovers
            console.print(f"removed {left.name}, left behind by an interrupted run", style="yellow")
        engine = build_engine(settings, trust_pickle)  # the model loads only now, after every cheap check
        with progress_bar(f"{task.label} · {handle.name}") as update:
            result = run_item(
                handle,
                item,
                engine,
                sink,
                tile_size=settings.tile_size,
                overlap=settings.overlap,
                force=force,
                samples_uncertainty=uncertainty,
                progress=update,
                verify="full" if verify else "quick",
            )
        if preview:
            from lpfm_toolkit.preview import write_preview

            png = write_preview(
                handle, item, result.output.uri, preview, uncertainty=result.output.extra.get("uncertainty")
            )
            result.output.extra["preview"] = str(png)
        return result


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
@click.option("-p", "--prompt", required=True, help='What to do, e.g. "sr x2", "denoise", "AF -> H&E".')
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to read.")
@click.option("--region", "region_text", default=None, help="x,y,width,height in pixels of the level (default: all).")
@click.option("--out", default=None, help="Output folder, or a file name ending in .ome.tiff (default: lpfm-out/).")
@click.option("--mpp", type=float, default=None, help="Pixel size in µm for images that do not record it.")
@click.option("--preview", default=None, help="Also write a before/after PNG of the centre of the region here.")
@click.option(
    "--verify",
    "verify",
    is_flag=True,
    help="Before reusing an earlier result, decode all of it against its checksums (default: header only).",
)
@engine_options
@handle_errors
def enhance(
    slide: Path,
    prompt: str,
    level: int,
    region_text: str | None,
    out: str | None,
    mpp: float | None,
    preview: str | None,
    verify: bool,
    force: bool,
    trust_pickle: bool,
    **flags: Any,
) -> None:
    """Enhance or virtually stain SLIDE by PROMPT into a new pyramidal OME-TIFF (the original is untouched)."""
    settings = settings_from_flags(**flags)
    report(run_local(slide, prompt, level, region_text, out, settings, force, trust_pickle, mpp, preview, verify))


@click.command()
@click.option("-p", "--prompt", default="sr x2", show_default=True)
@click.option("--region", "region_text", default=DEMO_REGION, show_default=True)
@click.option("--out", default=None, help="Output folder (default: lpfm-out/).")
@engine_options
@handle_errors
def demo(prompt: str, region_text: str, out: str | None, force: bool, trust_pickle: bool, **flags: Any) -> None:
    """Enhance a region of the bundled CC0 sample slide (CMU-1 cut, Aperio SVS) and say where it went."""
    settings = settings_from_flags(**flags)
    slide = sample_slide_path()
    out = out or settings.output_dir
    console.print(f"sample slide: {slide.name} (CC0, OpenSlide CMU-1 cut), region {region_text}, prompt {prompt!r}")
    preview = str(Path(out) / "demo-before-after.png")
    report(run_local(slide, prompt, 0, region_text, out, settings, force, trust_pickle, preview=preview))


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
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="The bundle folder the output was made with, if it has moved.")
@click.option("--trust-pickle", is_flag=True)
@handle_errors
def reproduce(output: Path, model: str | None, trust_pickle: bool) -> None:
    """Check OUTPUT's file, re-run it from its provenance and compare the pixels (exit 1 if anything differs)."""
    from lpfm_toolkit.verify import reproduce as reproduce_output

    with progress_bar(f"reproducing {output.name}") as update:
        rep = reproduce_output(output, model=model, trust_pickle=trust_pickle, progress=update)
    for note in rep.notes:
        console.print(f"warning: {note}", style="yellow")
    for problem in rep.file_problems:
        err_console.print(f"file damaged: {problem}", style="bold red", markup=False)
    console.print(f"recorded output sha256 {rep.recorded_sha256}")
    console.print(f"reproduced          {rep.reproduced_sha256}")
    same = rep.recorded_sha256 == rep.reproduced_sha256
    console.print("identical pixels" if same else "pixels DIFFER", style="green" if same else "bold red")
    if not rep.identical:
        sys.exit(1)
