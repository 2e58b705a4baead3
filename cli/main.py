"""The ``lpfm`` command. Subcommands load on first use so ``lpfm --help`` stays instant."""

from __future__ import annotations

import importlib
from typing import Any

import click

from lpfm_toolkit import __version__
from lpfm_toolkit.cli.common import setup_logging

# name → "module:attribute"; modules are imported only when the command runs or its help is shown.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("lpfm_toolkit.cli.local", "info"),
    "enhance": ("lpfm_toolkit.cli.local", "enhance"),
    "demo": ("lpfm_toolkit.cli.local", "demo"),
    "provenance": ("lpfm_toolkit.cli.local", "provenance"),
    "reproduce": ("lpfm_toolkit.cli.local", "reproduce"),
    "verify": ("lpfm_toolkit.cli.local", "verify"),
    "config": ("lpfm_toolkit.cli.config", "config"),
    "qupath": ("lpfm_toolkit.cli.qupath", "qupath"),
    "omero": ("lpfm_toolkit.cli.omero", "omero"),
    "models": ("lpfm_toolkit.cli.models", "models"),
    "train": ("lpfm_toolkit.cli.models", "train"),
    "evaluate": ("lpfm_toolkit.cli.models", "evaluate"),
    "jobs": ("lpfm_toolkit.cli.jobs", "jobs"),
    "qc": ("lpfm_toolkit.cli.qc", "qc"),
}

SHORT_HELP = {
    "info": "Show levels, pixel size and channels of a slide.",
    "enhance": "Enhance or virtually stain a slide region by prompt.",
    "demo": "Enhance a region of the bundled sample slide.",
    "provenance": "Read the provenance of an output.",
    "reproduce": "Re-run an output from its provenance and compare pixels.",
    "verify": "Check an output against its checksums and provenance.",
    "config": "Show the effective settings.",
    "qupath": "Run over QuPath projects and add results to them.",
    "omero": "Run over OMERO images and ROIs and push results back.",
    "models": "List, inspect and verify model bundles.",
    "train": "Train model bundles from clean slides.",
    "evaluate": "Score bundles and classical baselines on degraded slides.",
    "jobs": "Queue, run and watch enhancement jobs (local pool, Dask, Slurm).",
    "qc": "Find blurred, noisy and over-compressed regions; rank slides worst first.",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | {k for k in LAZY_COMMANDS if self._available(k)})

    @staticmethod
    def _available(name: str) -> bool:
        module = LAZY_COMMANDS[name][0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in LAZY_COMMANDS or not self._available(name):
            return cmd
        module, attr = LAZY_COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lpfm")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """lpfm — enhance and virtually stain pathology images by prompt, with provenance.

    Originals are never modified: every result is a new file, QuPath entry or OMERO image.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    setup_logging(verbose, debug)


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="lpfm")


if __name__ == "__main__":  # pragma: no cover
    main()
