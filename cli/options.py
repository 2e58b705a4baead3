"""The command-line flags of :class:`~lpfm_toolkit.options.EngineOptions` and of the run (seed, tiling, output),
shared by every command that runs an engine; each flag is its setting's key with dashes."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import click

from lpfm_toolkit.options import ENGINES, SAMPLERS, EngineOptions

#: flags of the run that are settings but not engine options (click parameter name → setting key)
RUN_FLAGS = {
    "seed": "seed",
    "tile_size": "tile_size",
    "overlap": "overlap",
    "compression": "compression",
    "tiff_tile": "tiff_tile",
}


def engine_flag_list(
    engine_help: str = "auto: the default model bundle if installed, else classical.",
    only: Collection[str] | None = None,
) -> list[Any]:
    """The click options that choose and tune an engine, and the run's seed, tiling and compression.

    ``only``: just the options of these parameter names (``tile_size`` for ``--tile``).
    """
    flags = [
        click.option("--engine", type=click.Choice(ENGINES), default=None, help=engine_help),
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
            help="Stochastic samples per tile; >1 writes their mean and a per-pixel uncertainty map (the "
            "lpfm engine then refines with the bundle's default steps unless --steps is given).",
        ),
        click.option(
            "--sampler",
            type=click.Choice(SAMPLERS),
            default=None,
            help="Diffusion sampler of the lpfm engine: ddim, or dpm (DPM-Solver++) (default: the bundle's).",
        ),
        click.option(
            "--tta", is_flag=True, default=None, help="Test-time augmentation (lpfm engine: 8 flips/turns averaged)."
        ),
        click.option(
            "--trust-pickle",
            is_flag=True,
            default=None,
            help="Allow pickled (.pt/.ckpt) weights. Only for files you trust.",
        ),
        click.option("--threads", type=int, default=None, help="Math threads (default: the free cores)."),
        click.option("--compile", is_flag=True, default=None, help="torch.compile the networks (lpfm engine)."),
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
    return [flag for flag in flags if only is None or _name(flag) in only]


def _name(option: Any) -> str:
    """The parameter name of a ``click.option`` decorator."""

    @option
    def probe() -> None: ...

    return str(probe.__click_params__[0].name)  # type: ignore[attr-defined]


def engine_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: :func:`engine_flag_list` and ``--force``."""
    opts = [
        *engine_flag_list(),
        click.option("--force", is_flag=True, help="Redo work even if an identical result exists."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def options_from_flags(flags: dict[str, Any], settings: Any = None) -> tuple[EngineOptions, Any]:
    """``(EngineOptions, Settings)`` from the user's settings and the command's flags (both layers resolved once).

    ``flags`` holds the parameters of :func:`engine_flag_list` (others are refused).
    """
    from lpfm_toolkit.config import load_settings

    settings = settings if settings is not None else load_settings()
    run = {key: flags.get(name) for name, key in RUN_FLAGS.items()}
    engine = {k: v for k, v in flags.items() if k not in RUN_FLAGS}
    return EngineOptions.from_settings(settings, **engine), settings.replace(**run)
