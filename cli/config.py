"""``lpfm config show``: the effective settings and where each came from."""

from __future__ import annotations

import click
from rich.table import Table

from lpfm_toolkit.cli.common import console, handle_errors


@click.group()
def config() -> None:
    """Inspect settings (defaults → config file → LPFM_* environment → flags)."""


@config.command("show")
@handle_errors
def show() -> None:
    """Print every setting, its value and its origin."""
    from lpfm_toolkit.config import config_path, load_settings

    settings = load_settings()
    table = Table(title=f"lpfm settings (file: {config_path()})")
    table.add_column("setting")
    table.add_column("value")
    table.add_column("from")
    for name, value, origin in settings.as_rows():
        table.add_row(name, value, origin)
    console.print(table)
