"""``lpfm models list/info/verify``, ``lpfm train`` and ``lpfm evaluate``: thin wrappers over the engine library."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lpfm_toolkit.cli.common import console, handle_errors, progress_bar
from lpfm_toolkit.errors import ConfigError, ModelError


@click.group()
def models() -> None:
    """List, inspect and verify model bundles."""


@models.command("list")
@handle_errors
def list_models() -> None:
    """The bundles shipped with the toolkit and those in the user bundle folder ($LPFM_MODELS_DIR)."""
    from rich.table import Table

    from lpfm_toolkit.engine.bundle import (
        SHIPPED_DIR,
        index_checksum,
        read_index,
        shipped_bundles,
        user_bundles,
        user_models_dir,
    )

    table = Table("name", "where", "tasks", "default steps", "size (MB)", "sha256")
    shipped = shipped_bundles()
    found = [(name, SHIPPED_DIR / name, "shipped") for name in shipped]
    found += [(n, user_models_dir() / n, "user" if n not in shipped else "user (hidden by shipped)")
              for n in user_bundles()]
    for name, path, where in found:
        try:
            index = read_index(path)
        except ModelError as exc:
            table.add_row(name, where, f"[red]unreadable: {exc.message}[/red]", "", "", "")
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        table.add_row(
            name,
            where,
            ", ".join(index.get("tasks", [])),
            str(index.get("default_steps", 0)),
            f"{size:.1f}",
            index_checksum(index)[:16] + "…",
        )
    console.print(table)


@models.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print model_index.json with the bundle checksum.")
@handle_errors
def info(model: str, as_json: bool) -> None:
    """Show a bundle's components, tasks and checksum (MODEL is a shipped name or a folder)."""
    from lpfm_toolkit.engine.bundle import index_checksum, read_index, resolve

    path = resolve(model)
    index = read_index(path)
    if as_json:
        console.print_json(json.dumps({**index, "sha256": index_checksum(index), "path": str(path)}))
        return
    console.print(f"[bold]{index.get('name', path.name)}[/bold]  {path}")
    console.print(f"sha256 {index_checksum(index)}")
    console.print(
        f"tasks: {', '.join(index.get('tasks', []))}; default steps {index.get('default_steps', 0)}, "
        f"sampler {index.get('default_sampler', 'ddim')}"
    )
    for role, folder in index.get("components", {}).items():
        cfg = json.loads((path / folder / "config.json").read_text())
        console.print(f"  {role}: {cfg.get('class')} ({cfg.get('dtype', 'float32')} weights)")
    card = path / "MODEL_CARD.md"
    if card.is_file():
        console.print(f"model card: {card}")


@models.command()
@click.argument("model")
@handle_errors
def verify(model: str) -> None:
    """Check every file of a bundle against its recorded sha256 and load each component."""
    from lpfm_toolkit.engine.bundle import load_bundle, resolve
    from lpfm_toolkit.engine.bundle import verify as verify_bundle

    path = resolve(model)
    problems = verify_bundle(path)
    if problems:
        raise ModelError(
            f"bundle {path} failed verification: " + "; ".join(problems),
            "restore the bundle from its source or retrain it",
        )
    bundle = load_bundle(path)
    console.print(
        f"[green]ok[/green] {bundle.name}: {len(bundle.index['files'])} files match, "
        f"components {', '.join(bundle.components)} load; sha256 {bundle.sha256}"
    )


@click.command()
@click.option(
    "--recipe", "recipe_name", default="tiny", show_default=True, help="Training recipe (tiny, tiny-blind, smoke)."
)
@click.option(
    "--images",
    "-i",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Clean slides/images or folders of them (default: the bundled sample slide). Repeatable.",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the finished bundle here.")
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default=Path("lpfm-train"),
    show_default=True,
    help="Checkpoints and logs; re-running resumes from here.",
)
@click.option("--name", default="lpfm-custom", show_default=True, help="Bundle name.")
@click.option(
    "--stages", default="encoder,restorer,stainer,refiner", show_default=True, help="Comma-separated stages to run."
)
@click.option("--holdout", type=float, default=None, help="Bottom fraction of each image kept for validation.")
@click.option("--restorer-steps", type=int, default=None)
@click.option("--encoder-steps", type=int, default=None)
@click.option("--refiner-steps", type=int, default=None)
@click.option("--batch", type=int, default=None)
@click.option("--crop", type=int, default=None, help="Training crop edge in pixels.")
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=int, default=None, help="CPU threads (default: the free cores).")
@click.option("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available).")
@click.option(
    "--max-minutes",
    type=float,
    default=None,
    help="Per-stage wall-time budget: the learning rate anneals over it and the stage stops at it.",
)
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming from --work-dir.")
@click.option(
    "--task",
    "task_kind",
    type=click.Choice(["restore", "stain"]),
    default="restore",
    show_default=True,
    help="restore: SR/deblur/denoise from clean slides; stain: virtual staining from --pairs.",
)
@click.option(
    "--pairs",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder with source/ and target/ registered image pairs (same names) for --task stain.",
)
@click.option("--source-stain", default="AF", show_default=True, help="Stain of the pairs' source images.")
@click.option("--target-stain", default="H&E", show_default=True, help="Stain of the pairs' target images.")
@handle_errors
def train(
    recipe_name: str,
    images: tuple[Path, ...],
    out: Path | None,
    work_dir: Path,
    name: str,
    stages: str,
    holdout: float | None,
    restorer_steps: int | None,
    encoder_steps: int | None,
    refiner_steps: int | None,
    batch: int | None,
    crop: int | None,
    lr: float | None,
    seed: int | None,
    threads: int | None,
    device: str | None,
    max_minutes: float | None,
    no_resume: bool,
    task_kind: str,
    pairs: Path | None,
    source_stain: str,
    target_stain: str,
) -> None:
    """Train a bundle from clean slides with LPFM's degradation protocol (see docs/engine.md)."""
    from lpfm_toolkit.engine.device import configure_cpu_threads
    from lpfm_toolkit.engine.train import recipe, train_stain_bundle
    from lpfm_toolkit.engine.train import train as run_training
    from lpfm_toolkit.prompts import Stain

    config = recipe(
        recipe_name,
        images=[str(p) for p in images] or None,
        holdout=holdout,
        restorer_steps=restorer_steps,
        encoder_steps=encoder_steps,
        refiner_steps=refiner_steps,
        batch=batch,
        crop=crop,
        lr=lr,
        seed=seed,
        max_minutes=max_minutes,
        device=device,
        pairs=str(pairs) if pairs else None,
    )
    used = configure_cpu_threads(threads)
    console.print(f"recipe {recipe_name}, {used} CPU thread(s), work dir {work_dir}")
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    with progress_bar("training") as update:

        def progress(stage: str, step: int, total: int, values: dict[str, float]) -> None:
            update(step, total)

        if task_kind == "stain":
            if out is None:
                raise ConfigError("--task stain needs --out DIR for the bundle")
            try:
                stains = Stain(source_stain).value, Stain(target_stain).value
            except ValueError as exc:
                raise ConfigError(str(exc), f"stains: {', '.join(s.value for s in Stain)}") from exc
            result = train_stain_bundle(
                config, work_dir, out, name, stains[0], stains[1], progress, resume=not no_resume
            )
        else:
            result = run_training(
                config, work_dir, out=out, stages=chosen, progress=progress, resume=not no_resume, name=name
            )
    if result is not None:
        console.print(f"bundle written to {result}")
    else:
        console.print(f"stages {', '.join(chosen)} done; checkpoints in {work_dir}")


@click.command()
@click.argument("image", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "models_", multiple=True, help="Bundle name or folder (default: lpfm-tiny). Repeatable.")
@click.option("--steps", "steps_list", multiple=True, type=int, help="Steps to score (repeatable; 0 = restorer).")
@click.option("--samples", type=int, default=4, show_default=True, help="Samples per tile when steps > 0.")
@click.option("--sampler", type=click.Choice(["ddim", "dpm"]), default=None)
@click.option("--degradations", default=None, help="Comma-separated subset, e.g. sr-x2,denoise-s31,deblur.")
@click.option("--tiles", type=int, default=16, show_default=True, help="Held-out tiles to score.")
@click.option("--tile", "tile_size", type=int, default=128, show_default=True)
@click.option(
    "--holdout",
    type=float,
    default=0.2,
    show_default=True,
    help="Score tiles from this bottom fraction of the image (0: the whole image).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.option("--tta", is_flag=True, help="Also score each bundle with the 8-fold flip/rotation self-ensemble.")
@click.option(
    "--tuned/--no-tuned",
    default=True,
    show_default=True,
    help="Also score baselines given the truth: true σ (NLM, TV, wavelet, BM3D), true kernel "
    "(Wiener, Richardson–Lucy), spline; BM3D with σ estimated.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("lpfm-eval"), show_default=True)
@handle_errors
def evaluate(
    image: Path | None,
    models_: tuple[str, ...],
    steps_list: tuple[int, ...],
    samples: int,
    sampler: str | None,
    degradations: str | None,
    tiles: int,
    tile_size: int,
    holdout: float,
    seed: int,
    device: str | None,
    tta: bool,
    tuned: bool,
    out: Path,
) -> None:
    """Score bundles against the classical baselines on degraded held-out tiles of IMAGE (default: the sample)."""
    from lpfm_toolkit.engine.bundle import load_bundle
    from lpfm_toolkit.engine.evaluate import Candidate, holdout_tiles, write_html, write_json
    from lpfm_toolkit.engine.evaluate import evaluate as run_eval
    from lpfm_toolkit.engine.lpfm import LpfmEngine
    from lpfm_toolkit.engine.train import SAMPLE_SLIDE, read_rgb

    if samples < 1:
        raise ConfigError("--samples must be at least 1")
    clean = holdout_tiles(read_rgb(image or SAMPLE_SLIDE), tile_size, tiles, holdout)
    candidates = []
    for m in models_ or (None,):
        bundle = load_bundle(m)
        for steps in steps_list or (0,):
            k = samples if steps else 1
            label = f"{bundle.name} steps={steps}" + (f" samples={k}" if steps else "")
            engine = LpfmEngine(bundle, device=device, steps=steps, samples=k, sampler=sampler)
            candidates.append(Candidate(label, engine, learned=True))
            if tta and steps == 0:
                engine = LpfmEngine(bundle, device=device, steps=0, sampler=sampler, tta=True)
                candidates.append(Candidate(f"{label} +tta", engine, learned=True))
    protocols = [p.strip() for p in degradations.split(",")] if degradations else None
    with progress_bar("evaluating") as update:
        report = run_eval(clean, candidates, protocols, seed=seed, progress=update, tuned=tuned)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report.to_markdown() + "\n")
    write_json(report, out / "report.json")
    html_path = write_html(report, out / "report.html")
    console.print(report.to_markdown(), markup=False)
    console.print(f"report: {html_path}")
