"""Shared CLI plumbing: one console, error mapping, progress bars, settings.

The CLI is thin (STYLE.md lesson 11): commands parse options, call one library function, and turn
:class:`~lpfm_toolkit.errors.LpfmError` into one red line and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lpfm_toolkit.errors import LpfmError

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def is_debug() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.obj and isinstance(ctx.obj, dict) and ctx.obj.get("debug"):
            return True
        ctx = ctx.parent
    return False


def fail(message: str, hint: str | None = None, code: int = 2) -> None:
    """Print one red line and exit."""
    text = " ".join((f"error: {message}" + (f" — {hint}" if hint else "")).split())  # one line, always
    err_console.print(text, style="bold red", markup=False, soft_wrap=True)
    sys.exit(code)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def handle_errors(func: F) -> F:
    """Map toolkit errors (and a few common ones) to one line and a non-zero exit, unless --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LpfmError as exc:
            if is_debug():
                raise
            fail(exc.message, exc.hint, exc.exit_code)
        except KeyboardInterrupt:
            if is_debug():
                raise
            fail("interrupted", "nothing half-written was left; re-run the same command to continue", 130)
        except (OSError, MemoryError) as exc:
            if is_debug():
                raise
            fail(f"{type(exc).__name__}: {_one_line(exc)}", "re-run with --debug for the full traceback", 1)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last net: a user never sees a traceback without --debug
            if is_debug():
                raise
            fail(
                f"unexpected {type(exc).__name__}: {_one_line(exc)}",
                "this is a bug in lpfm; re-run with --debug and report the traceback",
                1,
            )

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, shown from the first update; yields ``update(done, total)``."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    prog = Progress(*columns, console=err_console, transient=False)
    task_id = prog.add_task(description, total=total)
    started = False

    def update(done: int, tot: int) -> None:
        nonlocal started
        if not started:
            prog.start()
            started = True
        prog.update(task_id, completed=done, total=tot)

    try:
        yield update
    finally:
        if started:
            prog.stop()


def levels_table(desc: dict[str, Any], title: str) -> Any:
    """A rich table of an image's pyramid levels from ``ImageHandle.describe()``."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("level", "width", "height", "downsample", "µm/px"):
        table.add_column(col, justify="right")
    for i, lv in enumerate(desc["levels"]):
        mpp = f"{desc['mpp'][0] * lv['downsample']:.4g}" if desc.get("mpp") else "unknown"
        table.add_row(str(i), str(lv["width"]), str(lv["height"]), f"{lv['downsample']:.3g}", mpp)
    return table


def setup_logging(verbose: int, debug: bool) -> None:
    level = logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING)
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=debug)])
