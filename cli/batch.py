"""How every command shows a batch: a rich progress display (items and the running item's tiles, each with its
ETA), one summary table, one count line, and the exit code of :func:`lpfm_toolkit.batch.exit_code`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from lpfm_toolkit.batch import (
    COLUMNS,
    BatchProgress,
    BatchProgressFn,
    Outcome,
    Status,
    exit_code,
    summary,
    summary_rows,
)
from lpfm_toolkit.cli.common import console, err_console

STYLES = {
    Status.DONE: "green",
    Status.SKIPPED: "cyan",
    Status.FAILED: "bold red",
    Status.NOTHING: "yellow",
    Status.NOT_RUN: "yellow",
}


def eta_text(seconds: float | None) -> str:
    """``ETA 1:20`` (``ETA 1:02:03`` past an hour), or ``ETA …`` while there is nothing to go by."""
    if seconds is None:
        return "ETA …"
    s = int(round(seconds))
    return f"ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"ETA {s // 60}:{s % 60:02d}"


@contextlib.contextmanager
def batch_progress(title: str, *, eager: bool = False) -> Iterator[BatchProgressFn]:
    """A rich display on stderr, drawn from the first tile (``eager``: from the first update, for batches whose
    items report no tiles): one bar over the items, one over the running item's tiles, each with the ETA the
    library estimates; yields the callback :func:`run_items` takes."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
    ]
    prog = Progress(*columns, console=err_console, transient=False)
    overall = prog.add_task(title, total=None, eta="")
    current = prog.add_task("", total=None, eta="", visible=False)
    started = False

    def update(p: BatchProgress) -> None:
        nonlocal started
        if not started:
            if not (eager or p.tiles_total):  # from the first tile: failed checks and skipped items draw no bar
                return
            prog.start()
            started = True
        prog.update(overall, completed=p.finished, total=p.total, eta=eta_text(p.eta_s) if p.finished < p.total else "")
        if p.outcome is not None:
            prog.update(current, visible=False)
            return
        prog.update(  # the running item's row, once it reports tiles
            current,
            description=f"  {p.label}",
            completed=p.tiles_done,
            total=p.tiles_total or None,
            eta=eta_text(p.item_eta_s),
            visible=bool(p.tiles_total),
        )

    try:
        yield update
    finally:
        if started:
            prog.stop()


def summary_table(outcomes: Iterable[Outcome], title: str) -> Table:
    """The one summary table: item, status, result, time, note."""
    table = Table(title=Text(title))
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for item, status, result, seconds, note in summary_rows(outcomes):
        table.add_row(Text(item), Text(status.value, style=STYLES[status]), Text(result), seconds, Text(note))
    return table


def report_batch(outcomes: list[Outcome], title: str) -> None:
    """Print the summary table and counts, and exit 1 when any item failed or was not run."""
    console.print(summary_table(outcomes, title))
    console.print(summary(outcomes))
    code = exit_code(outcomes)
    if code:
        sys.exit(code)
