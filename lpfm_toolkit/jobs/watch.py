"""Finding work: slides dropped into a folder, QuPath entries flagged in their metadata; adding it to a store.

A folder is looked at twice: a file is taken only when its size and modification time are the same at a
look at least ``settle_s`` seconds after it was first seen that way, so files still being copied wait.
Each look is remembered in the store (``sightings``), so the two looks may also be two cron runs. lpfm's
own outputs (an ``.ome.tiff`` with its ``.lpfm.json`` sidecar, uncertainty maps, scratch folders) and the
output folder are never taken as input.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lpfm_toolkit.errors import ConfigError, LpfmError, SlideNotFoundError
from lpfm_toolkit.jobs.spec import JobSpec, prepare
from lpfm_toolkit.jobs.store import JobStore, NewJob, one_line_error

log = logging.getLogger(__name__)

#: what a folder watcher takes by default: whole-slide formats (not PNG/JPEG, which folders hold as thumbnails)
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide", ".tif", ".tiff", ".btf")
#: the QuPath metadata key that flags an entry for enhancement; its value is the prompt
FLAG_KEY = "lpfm.enhance"
_YES = ("1", "true", "yes", "on")

PENDING, ADDED, REJECTED = "pending", "added", "rejected"


@dataclass
class AddReport:
    """What adding work did: new job keys, keys already in the store, and sources that could not be added."""

    added: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (source, one-line error)
    waiting: list[str] = field(default_factory=list)  # files still changing (watcher only)


def add_jobs(store: JobStore, specs: Iterable[JobSpec], *, strict: bool = True) -> AddReport:
    """Compute each spec's idempotency key and queue the new ones.

    ``strict``: the first source that cannot be read, planned or run by its engine raises and nothing is added;
    otherwise it is reported in ``rejected`` and the others are added.
    """
    report = AddReport()
    new: dict[str, NewJob] = {}
    for spec in specs:
        try:
            spec, key = prepare(absolute(spec))
        except (LpfmError, OSError, ValueError) as exc:
            if strict:
                raise
            report.rejected.append((spec.source + (f"#{spec.entry}" if spec.entry else ""), one_line_error(exc)))
            continue
        new.setdefault(key, NewJob(key, spec.to_dict(), spec.source, spec.label()))
    added = set(store.add(new.values()))
    for job in new.values():
        (report.added if job.key in added else report.existing).append(job.key)
    return report


def absolute(spec: JobSpec) -> JobSpec:
    """``spec`` with its source and output folder as absolute paths (workers may start elsewhere); a source
    that is a URI (``omero://host:port``) is left as it is."""
    out = str(Path(spec.out).expanduser().resolve()) if spec.out else spec.out
    source = spec.source if "://" in spec.source else str(Path(spec.source).expanduser().resolve())
    return dataclasses.replace(spec, source=source, out=out)


def is_lpfm_output(path: Path) -> bool:
    """True for files lpfm wrote: results (they have a sidecar), uncertainty maps, sidecars, scratch files."""
    from lpfm_toolkit.sinks.ometiff import sidecar_path

    name = path.name.lower()
    if name.endswith((".lpfm.json", ".uncertainty.ome.tiff")) or any(p.startswith(".lpfm-") for p in path.parts):
        return True
    return name.endswith((".ome.tiff", ".ome.tif")) and sidecar_path(path).exists()


def scan_folder(folder: str | Path, extensions: Sequence[str] = SLIDE_EXTENSIONS, *, recursive: bool = False,
                exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Slide files in ``folder`` by extension, sorted; hidden files, lpfm outputs and ``exclude`` folders skipped."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SlideNotFoundError(f"{root} is not a folder", "give the folder that slides are copied into")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    skip = [Path(e).expanduser().resolve() for e in exclude]
    found = []
    for p in root.rglob("*") if recursive else root.iterdir():
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if not p.name.lower().endswith(exts) or is_lpfm_output(p):
            continue
        resolved = p.resolve()
        if any(resolved.is_relative_to(s) for s in skip):
            continue
        found.append(p)
    return sorted(found)


def watch_folder(store: JobStore, folder: str | Path, template: JobSpec, *,
                 extensions: Sequence[str] = SLIDE_EXTENSIONS, recursive: bool = False, settle_s: float = 30.0,
                 wait: bool = True, sleep: Callable[[float], None] = time.sleep) -> AddReport:
    """Add a job (``template`` with the file as source) for every settled new slide in ``folder``.

    A file is settled when its size and mtime have not changed for ``settle_s`` seconds between two looks,
    or at the first look when neither its content nor its inode changed for ``settle_s`` seconds (mtime
    and ctime both older: a file long finished is taken without waiting).
    ``wait``: when some files are not settled yet, sleep until they could be and look once more (a cron run
    then needs no second run); without it they are left for the next call. Files that cannot be opened are
    reported once and not tried again until they change.
    """
    if template.kind != "file":
        raise ConfigError("a folder watcher makes file jobs", "use watch_qupath for QuPath projects")
    recipe = template.recipe()
    report = AddReport()
    exclude = [template.out] if template.out else []

    def untouched(st: os.stat_result) -> bool:
        return time.time() - max(st.st_mtime, st.st_ctime) >= max(settle_s, 1.0)

    def look() -> list[tuple[str, int, int]]:
        """Record this look; returns ``(path, size, mtime)`` of files settled and not handled yet."""
        ready: list[tuple[str, int, int]] = []
        report.waiting = []
        now = time.time()
        for p in scan_folder(folder, extensions, recursive=recursive, exclude=exclude):
            try:
                st = p.stat()
            except FileNotFoundError:  # moved away between listing and looking
                continue
            path, stamp = str(p.resolve()), (st.st_size, st.st_mtime_ns)
            prev = store.sighting(path, recipe)
            if prev is None or (prev["size"], prev["mtime"]) != stamp:
                store.record_sighting(path, recipe, *stamp, PENDING)
                if untouched(st):
                    ready.append((path, *stamp))  # nothing changed it (not even its inode) for settle_s: finished
                else:
                    report.waiting.append(path)
            elif prev["status"] == PENDING and (now - prev["seen"] >= settle_s or untouched(st)):
                ready.append((path, *stamp))
            elif prev["status"] == PENDING:
                report.waiting.append(path)
        return ready

    ready = look()
    if report.waiting and wait:
        sleep(settle_s)
        ready = look()
    for path, size, mtime in ready:
        try:
            spec, key = prepare(absolute(dataclasses.replace(template, source=path)))
        except (LpfmError, OSError, ValueError) as exc:
            error = one_line_error(exc)
            store.record_sighting(path, recipe, size, mtime, REJECTED, error, keep_seen=True)
            report.rejected.append((path, error))
            log.warning("not adding %s: %s", path, error)
            continue
        try:
            st = Path(path).stat()
            unchanged = (st.st_size, st.st_mtime_ns) == (size, mtime)
        except FileNotFoundError:
            unchanged = False
        if not unchanged:  # it changed while it was read: look again next time
            report.waiting.append(path)
            continue
        added = store.add([NewJob(key, spec.to_dict(), spec.source, spec.label())])
        (report.added if added else report.existing).append(key)
        store.record_sighting(path, recipe, size, mtime, ADDED, key, keep_seen=True)
    return report


def qupath_specs(project: str | Path, template: JobSpec, *, prompt: str | None = None,
                 images: Sequence[str] | None = None, flag_key: str = FLAG_KEY) -> list[JobSpec]:
    """Job specs for entries of a QuPath project (whole image at ``template.level``; results are never picked).

    With ``images``, those entries; otherwise the entries whose metadata has ``flag_key``. The prompt is the
    flag's value, unless it is ``true``/``yes``/``1`` (then ``prompt``); without a flag, ``prompt`` itself.
    """
    from lpfm_toolkit.integrations.qupath import QuPathProject

    with QuPathProject.open(project, backend="file", readonly=True) as qp:
        path = str(qp.path.resolve())
        entries = qp.select(images) if images else [e for e in qp.select() if e.metadata.get(flag_key, "").strip()]
        specs = []
        for entry in entries:
            flag = entry.metadata.get(flag_key, "").strip()
            wanted = prompt if (not flag or flag.lower() in _YES) else flag
            if not wanted:
                raise ConfigError(f"entry {entry.id} ({entry.name}) is flagged {flag_key}={flag!r} but no prompt "
                                  "was given", f"set {flag_key} to a prompt such as 'sr x2', or pass --prompt")
            specs.append(dataclasses.replace(template, kind="qupath", source=path, entry=entry.id, prompt=wanted,
                                             region=None))
    return specs


def watch_qupath(store: JobStore, project: str | Path, template: JobSpec, *, prompt: str | None = None,
                 flag_key: str = FLAG_KEY) -> AddReport:
    """Add a job for every entry of ``project`` flagged with ``flag_key`` (already-added work adds nothing)."""
    return add_jobs(store, qupath_specs(project, template, prompt=prompt, flag_key=flag_key), strict=False)
