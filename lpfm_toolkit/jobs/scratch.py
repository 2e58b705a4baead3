"""Scratch folders of job outputs: who owns one, and removing those whose writer is gone.

An OME-TIFF is written into a ``.lpfm-scratch-*`` folder beside its final name and renamed when complete;
a writer killed with ``kill -9`` (or a power cut) leaves that folder behind. Jobs mark each scratch folder
they write with an owner file (``host:pid``), so the next run on that host can tell a dead writer's folder
from a live one and remove it. Folders without a mark (``lpfm enhance``, older versions, or a writer killed
between making the folder and marking it) are removed only when no process on this host has a file open in
them and nothing in them changed for an hour.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".lpfm-scratch-"
OWNER_FILE = "lpfm-owner"
#: an unmarked scratch folder untouched this long, with no file open in it, is abandoned
UNMARKED_AGE_S = 3600.0


class _Deferral:
    """Signal handlers of this process hold their interruption while a scratch folder is made and marked."""

    depth = 0
    pending: BaseException | None = None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Inside, :func:`defer` keeps a stop request; it is raised on leaving, once the folder is marked."""
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        if _Deferral.depth == 0 and _Deferral.pending is not None:
            exc, _Deferral.pending = _Deferral.pending, None
            raise exc


def defer(exc: BaseException) -> bool:
    """For signal handlers: True when ``exc`` was kept to be raised at the end of :func:`signals_deferred`."""
    if _Deferral.depth > 0:
        _Deferral.pending = exc
        return True
    return False


def owner() -> str:
    """``host:pid`` of this process, as written into the scratch folders it writes."""
    return f"{socket.gethostname()}:{os.getpid()}"


def mark_scratch(folder: Path) -> None:
    """Record this process (``host:pid``) as the writer of the scratch ``folder``."""
    try:
        (folder / OWNER_FILE).write_text(owner() + "\n", encoding="utf-8")
    except OSError as exc:  # the folder went away already (an aborted write): nothing to mark
        log.debug("could not mark %s: %s", folder, exc)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or it ended meanwhile
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _open_anywhere(folder: Path) -> bool | None:
    """Whether a process on this host has a file (or its working directory) in ``folder``; None: unknown."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    prefix = str(folder.resolve()) + os.sep
    uid = folder.stat().st_uid
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [entry / "cwd", *(entry / "fd").iterdir()]
            for link in links:
                if (os.readlink(link) + os.sep).startswith(prefix):
                    return True
        except PermissionError:
            try:
                if entry.stat().st_uid == uid:  # one of the folder owner's processes that we cannot inspect
                    return True
            except OSError:
                pass
        except OSError:  # the process ended meanwhile
            continue
    return False


def abandoned(folder: Path, *, own: bool = False, now: float | None = None) -> bool:
    """True when the scratch ``folder``'s writer is provably gone (its pid is dead on this host, or see above).

    ``own``: this process's own folders count as abandoned too (it stopped writing: a job was interrupted).
    """
    now = time.time() if now is None else now
    try:
        marked = (folder / OWNER_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        marked = ""
    except OSError:
        return False
    if marked:
        if own and marked == owner():
            return True
        host, _, pid = marked.rpartition(":")
        return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))
    try:
        newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()])
    except OSError:
        return False
    if now - newest < UNMARKED_AGE_S:
        return False
    return _open_anywhere(folder) is False


def clean_scratch(folder: str | Path, *, own: bool = False) -> list[Path]:
    """Remove the abandoned ``.lpfm-scratch-*`` folders directly in ``folder``; returns those removed.

    ``own``: also this process's own (call it only when none of its writers is still at work).
    """
    root = Path(folder)
    try:
        candidates = [
            p for p in root.iterdir() if p.name.startswith(SCRATCH_PREFIX) and p.is_dir() and not p.is_symlink()
        ]
    except OSError:  # no such folder yet, or not readable: nothing of ours to clean
        return []
    removed = []
    for p in candidates:
        if abandoned(p, own=own):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
                log.info("removed %s, left behind by a stopped writer", p)
    return removed
