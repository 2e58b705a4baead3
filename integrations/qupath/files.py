"""The file backend: reads and writes a QuPath project's JSON files directly (no QuPath, no Java).

Writes follow what QuPath does and never touch an existing entry: ``project.qpproj`` is re-read under a
lock, the new entry appended, ``lastID`` bumped, the previous file kept as ``project.qpproj.backup``, and
every file replaced atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lpfm_toolkit.errors import ProjectError
from lpfm_toolkit.integrations.qupath.entries import (
    KEY_IDEMPOTENCY,
    ProjectEntry,
    entry_json,
    parse_version,
    server_json,
)
from lpfm_toolkit.sources.base import Annotation

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lpfm-lock"
STALE_LOCK_S = 600.0


class ProjectNotFoundError(ProjectError, FileNotFoundError):
    """No ``project.qpproj`` where the user pointed."""


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    An existing file keeps its permissions; a new one gets the usual ``0o666 & ~umask``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """UTF-8 text version of :func:`write_bytes_atomic`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def project_file(path: Path | str) -> Path:
    """``project.qpproj`` for a project folder or file path."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "project.qpproj"
    if not p.is_file():
        raise ProjectNotFoundError(f"no QuPath project at {path}",
                                   "give the project folder or its project.qpproj file")
    return p


def qpproj_text(data: dict[str, Any]) -> str:
    """``project.qpproj`` text as QuPath's Gson writes it (2-space indent, UTF-8, no final newline)."""
    return json.dumps(data, indent=2, ensure_ascii=False)


def compact_text(data: dict[str, Any]) -> str:
    """``server.json``/``summary.json`` text (compact, as QuPath writes them)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


@contextlib.contextmanager
def project_lock(qpproj: Path, timeout_s: float = 60.0) -> Iterator[None]:
    """Serialise lpfm writers of one project (a lock file beside it; stale after ten minutes)."""
    lock = qpproj.with_name(qpproj.name + LOCK_SUFFIX)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError as exc:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                    log.warning("removing stale lock %s", lock)
                    lock.unlink()
                    continue
            if time.monotonic() > deadline:
                raise ProjectError(f"{qpproj} is locked by another lpfm process ({lock})",
                                   f"wait for it to finish, or delete {lock.name} if no lpfm is running") from exc
            time.sleep(0.1)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ProjectError(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno})",
                           f"restore it from {path.name}.backup or re-save the project in QuPath") from exc
    except UnicodeDecodeError as exc:
        raise ProjectError(f"{what} {path} is not UTF-8 text", "is this a QuPath project file?") from exc


class FileBackend:
    """Direct reading and writing of ``project.qpproj`` and ``data/<id>/*.json``."""

    name = "file"

    def __init__(self, qpproj: Path) -> None:
        self.path = qpproj
        self.directory = qpproj.parent
        self._data = self.load()

    def load(self) -> dict[str, Any]:
        """Read ``project.qpproj`` from disk and check its top-level shape."""
        data = _load_json(self.path, "QuPath project")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ProjectError(f"{self.path} has no 'images' list", "is this a QuPath project.qpproj?")
        return data

    @property
    def version_text(self) -> str | None:
        return self._data.get("version")

    @property
    def version(self) -> tuple[int, int, int]:
        return parse_version(self.version_text)

    @property
    def project_uri(self) -> str | None:
        """Where the project was when QuPath last saved it (for relative image resolution)."""
        return self._data.get("uri")

    def _summary(self, entry_id: Any) -> dict[str, Any] | None:
        path = self.directory / "data" / str(entry_id) / "summary.json"
        if not path.is_file():
            return None
        try:
            data = _load_json(path, "entry summary")
        except ProjectError as exc:
            log.warning("ignoring %s", exc)
            return None
        return data if isinstance(data, dict) else None

    def entries(self) -> list[ProjectEntry]:
        """Every entry, in project order."""
        return [ProjectEntry.from_json(img, self._summary(img.get("entryID"))) for img in self._data["images"]]

    def hierarchy_annotations(self, entry: ProjectEntry) -> None:
        """The file backend cannot read ``.qpdata`` (Java serialisation): annotations come from GeoJSON."""
        return None

    def server_json(self, entry_id: str) -> dict[str, Any] | None:
        """``data/<id>/server.json`` of an entry, when QuPath wrote one."""
        path = self.directory / "data" / str(entry_id) / "server.json"
        return _load_json(path, "server description") if path.is_file() else None

    def add_entry(self, name: str, image: Path, builder: dict[str, Any], metadata: dict[str, str],
                  annotations: Sequence[Annotation] = ()) -> ProjectEntry:
        """Append a new entry for ``image`` (never changing others) and return it.

        ``annotations`` cannot go into ``.qpdata`` from Python; the sink writes them as GeoJSON beside the
        image and the entry's metadata points there (``import_lpfm_annotations.groovy`` loads them).

        If an entry with the same idempotency key appeared meanwhile (another process), that one is returned.
        """
        with project_lock(self.path):
            raw = self.path.read_bytes()
            data = self.load()
            key = metadata.get(KEY_IDEMPOTENCY)
            for img in data["images"]:
                if key and (img.get("metadata") or {}).get(KEY_IDEMPOTENCY) == key:
                    self._data = data
                    return ProjectEntry.from_json(img)
            ids = [int(img["entryID"]) for img in data["images"] if str(img.get("entryID", "")).isdigit()]
            new_id = max([int(data.get("lastID") or 0), *ids]) + 1
            while (self.directory / "data" / str(new_id)).exists():  # orphaned folders of deleted entries
                new_id += 1
            version = parse_version(data.get("version"))
            image = entry_json(version, new_id, name, builder, metadata)
            data_dir = self.directory / "data" / str(new_id)
            data_dir.mkdir(parents=True)
            try:
                write_text_atomic(data_dir / "server.json", compact_text(server_json(version, builder)))
                data["images"].append(image)
                data["lastID"] = new_id
                write_bytes_atomic(self.path.with_name(self.path.name + ".backup"), raw)
                write_text_atomic(self.path, qpproj_text(data))
            except BaseException:
                for child in data_dir.iterdir():
                    child.unlink()
                data_dir.rmdir()
                raise
            self._data = data
            log.info("added entry %s %r to %s", new_id, name, self.path)
            return ProjectEntry.from_json(image)

    def close(self) -> None:
        """Nothing is held open between calls."""
