"""``lpfm config show``: the effective settings, section by section, and where each came from."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from lpfm_toolkit.cli.common import console, handle_errors


@click.group()
def config() -> None:
    """Inspect settings (defaults → config file → LPFM_* environment → flags)."""


@config.command("show")
@handle_errors
def show() -> None:
    """Print every setting by section ([engine] [tiling] [output] [omero] [jobs]), its value and its origin.

    The file uses the same sections and keys (a key is its flag's name: [tiling] tile is --tile); flat keys of
    earlier versions (tile_size = 128, omero_host = "…") are still read.
    """
    from lpfm_toolkit.config import KEYS, config_path, load_settings

    settings = load_settings()
    env = {k.field: k.env for k in KEYS}
    for section, rows in settings.sections().items():
        table = Table(title=Text(f"[{section}]", style="bold"), title_justify="left", show_edge=False)
        table.add_column("setting")
        table.add_column("value")
        table.add_column("from")
        table.add_column("variable", style="dim")
        for (name, value, origin), key in zip(rows, [k for k in KEYS if k.section == section], strict=True):
            table.add_row(name, value, origin, env[key.field])
        console.print(table)
    console.print(f"file: {config_path()}" + ("" if config_path().exists() else " (none)"))
