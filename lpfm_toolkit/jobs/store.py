"""The job store: one SQLite row per work item, safe for several runners and resumable after a crash.

States: ``queued`` → ``running`` → ``done`` | ``failed`` (``running`` → ``queued`` again on a retryable
failure or when its holder died). A job's key is the pipeline's idempotency key, so adding the same work
twice adds nothing. Claims happen inside ``BEGIN IMMEDIATE`` transactions, so two runners on one store never
take the same job. The store lives with the coordinating process only; workers never touch it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpfm_toolkit.errors import ConfigError
from lpfm_toolkit.jobs.scratch import pid_alive

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATES = (QUEUED, RUNNING, DONE, FAILED)
DEFAULT_STORE = "lpfm-jobs.sqlite"
SCHEMA_VERSION = 1
#: SQLite ``application_id`` of lpfm job stores ("LPFM"): files without it are never written to
APPLICATION_ID = 0x4C50464D
_MAGIC = b"SQLite format 3\x00"
MAX_ERROR_CHARS = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key         TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    source      TEXT NOT NULL,
    label       TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    result_uri  TEXT,
    worker      TEXT,
    lease_until REAL,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    started     REAL,
    finished    REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS sightings (
    path    TEXT NOT NULL,
    recipe  TEXT NOT NULL,
    size    INTEGER NOT NULL,
    mtime   INTEGER NOT NULL,
    seen    REAL NOT NULL,
    status  TEXT NOT NULL,
    note    TEXT,
    PRIMARY KEY (path, recipe)
);
"""

_JOB_COLUMNS = {"key", "spec", "source", "label", "state", "attempts", "last_error", "result_uri", "worker",
                "lease_until", "created", "updated", "started", "finished"}

# "password=…", "session key: …", "token …" → the value replaced; errors are stored and shown.
_SECRET = re.compile(r"(?i)\b(password|passwd|pwd|session[ _-]?key|sessionid|token|secret)(\s*[=:]\s*|\s+)(\S+)")


def worker_id() -> str:
    """``host:pid`` of this process: the holder recorded on the jobs it claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


def one_line_error(exc: BaseException | str) -> str:
    """An exception as one line (type, message, hint), secrets masked, at most 500 characters."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    text = _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"




@dataclass(frozen=True)
class Job:
    """One row of the store."""

    key: str
    spec: dict[str, Any]
    source: str
    label: str
    state: str
    attempts: int
    last_error: str | None
    result_uri: str | None
    worker: str | None
    lease_until: float | None
    created: float
    updated: float
    started: float | None
    finished: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["spec"] = json.loads(d["spec"])
        return cls(**d)


@dataclass(frozen=True)
class NewJob:
    """What :meth:`JobStore.add` inserts: the key, the JSON-able spec, and how to show it."""

    key: str
    spec: dict[str, Any]
    source: str
    label: str


class StoreError(ConfigError):
    """The job store cannot be used: missing, empty, damaged, someone else's database, or not writable."""


def _damaged(path: Path, detail: str) -> StoreError:
    detail = " ".join(detail.replace("*** in database main ***", "").split())
    detail = detail if len(detail) <= 160 else detail[:159] + "…"
    return StoreError(f"job store {path} is damaged ({detail})",
                      "restore it from a backup, or move it away and add the jobs again (finished outputs are "
                      "found by their key and not redone)")


def _database_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """A SQLite error as one line naming the store and what to do."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    low = text.lower()
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        return _damaged(path, text)
    if "readonly" in low or "read-only" in low:
        return StoreError(f"job store {path} cannot be written ({text})",
                          "make the file and its folder writable for this user, or give another --store")
    if "locked" in low or "busy" in low:
        return StoreError(f"job store {path} is locked by another process ({text})",
                          "wait for the other runner, or check that the store is on a local disk (not NFS)")
    if "unable to open" in low or "disk i/o" in low:
        return StoreError(f"job store {path} cannot be opened ({text})",
                          "check that it and its folder are readable and writable, on a local disk (not NFS)")
    return StoreError(f"job store {path}: {text}", "is it an lpfm job store on a local disk (not NFS)?")


def _header(path: Path) -> bytes:
    """The first 100 bytes of ``path`` (the SQLite header), read without SQLite and without writing."""
    with open(path, "rb") as fh:
        return fh.read(100)


class JobStore:
    """A SQLite job store at ``path`` (WAL journal, busy timeout); one connection per instance.

    Nothing is written to a file that is not an lpfm job store: before any PRAGMA that writes, the file's
    header (``application_id``, ``user_version``) and, for stores from before the ``application_id`` was
    set, its tables are checked; a store that fails ``PRAGMA quick_check`` is refused as damaged; a
    zero-byte file is refused. ``create``: make the store if there is no file (atomically: a complete empty
    store appears under ``path`` or nothing does). ``readonly``: open for reading only (``status``).
    Give each thread its own ``JobStore``; an instance serialises its own calls with a lock. Every SQLite
    error surfaces as a :class:`StoreError` (one line).
    """

    def __init__(self, path: str | Path, *, create: bool = True, readonly: bool = False,
                 busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self.readonly = readonly
        if self.path.is_dir():
            raise StoreError(f"job store {self.path} is a folder", "give a file name such as lpfm-jobs.sqlite")
        if not self.path.exists():
            if not create or readonly:
                raise StoreError(f"no job store at {self.path}", "add jobs first (lpfm jobs add), or give --store")
            self._create(self.path)
        legacy = self._check_identity()
        self._lock = threading.RLock()
        try:
            if readonly:
                self._db = self._connect_readonly(busy_timeout_s)
            else:
                self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                           check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            check = [r[0] for r in self._db.execute("PRAGMA quick_check(3)").fetchall()]
            if check != ["ok"]:
                raise _damaged(self.path, "; ".join(map(str, check)))
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                if legacy:  # a store of ours made before the application_id was set: mark it
                    with self._tx():
                        self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        except sqlite3.Error as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            raise _database_error(self.path, exc) from exc
        except BaseException:
            with contextlib.suppress(Exception):
                self._db.close()
            raise

    def _connect_readonly(self, busy_timeout_s: float) -> sqlite3.Connection:
        """A read-only connection; in a folder this user cannot write (no ``-shm`` can be made) and with no
        ``-wal`` beside the store (so no writer is active), the file is read as immutable."""
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=busy_timeout_s, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError:
            db.close()
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() or os.access(self.path.parent, os.W_OK):
                raise
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=busy_timeout_s,
                               isolation_level=None, check_same_thread=False)

    @staticmethod
    def _create(path: Path) -> None:
        """A new empty store at ``path``, made under a temporary name and linked into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            finally:
                db.close()
            try:
                os.link(tmp, path)  # never replaces a store another process created meanwhile
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not path.exists():
                    os.replace(tmp, path)
        except sqlite3.Error as exc:
            raise _database_error(path, exc) from exc
        except PermissionError as exc:
            raise StoreError(f"cannot create the job store {path} ({exc.strerror})",
                             "choose a folder this user may write, with --store or $LPFM_JOBS_STORE") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _check_identity(self) -> bool:
        """Refuse anything but an lpfm job store, reading only; True for an old store without application_id."""
        p = self.path
        if not p.is_file():
            raise StoreError(f"job store {p} is not a regular file", "give the path of an lpfm job store")
        try:
            size = p.stat().st_size
            head = _header(p) if size else b""
        except OSError as exc:
            raise StoreError(f"job store {p} cannot be read ({exc.strerror})",
                             "check its permissions, or give another --store") from exc
        if size == 0:
            raise StoreError(f"job store {p} is empty (0 bytes): it was truncated or is not a job store",
                             "restore it from a backup, or delete it and add the jobs again")
        if len(head) < 100 or not head.startswith(_MAGIC):
            raise StoreError(f"{p} is not an lpfm job store (not an SQLite database)",
                             "give the right --store, or a new path for a new store")
        user_version = int.from_bytes(head[60:64], "big")
        app_id = int.from_bytes(head[68:72], "big")
        if app_id == APPLICATION_ID:
            self._check_version(user_version)
            return False
        if app_id != 0:
            raise StoreError(f"{p} is not an lpfm job store (another application's database, application_id "
                             f"{app_id:#x})", "give the path of an lpfm job store, or a new path for a new store")
        # No application_id on disk: an older lpfm store (or its header still in the WAL), or someone else's
        # database. Read its version and tables through a read-only connection: nothing is written.
        try:
            ro = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
            try:
                user_version = ro.execute("PRAGMA user_version").fetchone()[0]
                app_id = ro.execute("PRAGMA application_id").fetchone()[0]
                tables = {r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                columns = {r[1] for r in ro.execute("PRAGMA table_info(jobs)")} if "jobs" in tables else set()
            finally:
                ro.close()
        except sqlite3.Error as exc:
            raise _database_error(p, exc) from exc
        if app_id == APPLICATION_ID:
            self._check_version(user_version)
            return False
        if app_id == 0 and user_version >= 1 and tables == {"jobs", "sightings"} and _JOB_COLUMNS <= columns:
            self._check_version(user_version)
            return True
        raise StoreError(f"{p} is not an lpfm job store (an SQLite database with other tables: "
                         f"{', '.join(sorted(tables)) or 'none'})",
                         "give the path of an lpfm job store, or a new path for a new store")

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(f"job store {self.path} was made by a newer lpfm-toolkit (schema {version})",
                             "upgrade lpfm-toolkit, or use another --store")
        if version < 1:
            raise _damaged(self.path, f"schema version {version}")

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (``BEGIN IMMEDIATE``) so readers never upgrade and deadlock."""
        if self.readonly:
            raise StoreError(f"job store {self.path} was opened read-only", "this is a bug: please report it")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _database_error(self.path, exc) from exc
            try:
                yield self._db
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise _database_error(self.path, exc) from exc
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _database_error(self.path, exc) from exc

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise _database_error(self.path, exc) from exc

    def _job(self, row: sqlite3.Row) -> Job:
        try:
            return Job.from_row(row)
        except (ValueError, TypeError) as exc:
            raise _damaged(self.path, f"job {str(dict(row).get('key'))[:12]} cannot be read: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- adding -----------------------------------------------------------------------------------
    def add(self, jobs: Iterable[NewJob]) -> list[str]:
        """Queue ``jobs``; keys already in the store (in any state) are left alone. Returns the keys added."""
        now = time.time()
        added = []
        with self._tx() as db:
            for job in jobs:
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs (key, spec, source, label, state, created, updated) "
                    "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                    (job.key, json.dumps(job.spec, sort_keys=True), job.source, job.label, now, now))
                if cur.rowcount:
                    added.append(job.key)
        return added

    # -- claiming and finishing -------------------------------------------------------------------
    def claim(self, worker: str, n: int = 1, lease_s: float = 600.0) -> list[Job]:
        """Atomically take up to ``n`` queued jobs (oldest first) for ``worker``; each claim is one attempt."""
        now = time.time()
        with self._tx() as db:
            keys = [r[0] for r in db.execute(
                "SELECT key FROM jobs WHERE state = 'queued' ORDER BY created, key LIMIT ?", (max(0, n),))]
            for key in keys:
                db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = ?, "
                           "lease_until = ?, started = ?, updated = ? WHERE key = ? AND state = 'queued'",
                           (worker, now + lease_s, now, now, key))
            rows = [db.execute("SELECT * FROM jobs WHERE key = ?", (k,)).fetchone() for k in keys]
        return [self._job(r) for r in rows]

    def renew(self, worker: str, lease_s: float = 600.0) -> int:
        """Extend the lease of every job ``worker`` holds; returns how many it holds."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET lease_until = ? WHERE state = 'running' AND worker = ?",
                              (time.time() + lease_s, worker)).rowcount

    def complete(self, key: str, worker: str, result_uri: str) -> bool:
        """Mark a job done with its result; False if ``worker`` no longer holds it (it was requeued)."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = 'done', result_uri = ?, last_error = NULL, worker = NULL, "
                             "lease_until = NULL, finished = ?, updated = ? "
                             "WHERE key = ? AND state = 'running' AND worker = ?", (result_uri, now, now, key, worker))
            return cur.rowcount == 1

    def fail(self, key: str, worker: str, error: BaseException | str, max_attempts: int = 3) -> str | None:
        """Record a failed attempt: ``queued`` again below ``max_attempts``, else ``failed``. Returns the new state."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM jobs WHERE key = ? AND state = 'running' AND worker = ?",
                             (key, worker)).fetchone()
            if row is None:
                return None
            state = FAILED if row[0] >= max_attempts else QUEUED
            db.execute("UPDATE jobs SET state = ?, last_error = ?, worker = NULL, lease_until = NULL, "
                       "finished = ?, updated = ? WHERE key = ?",
                       (state, one_line_error(error), now if state == FAILED else None, now, key))
        return state

    def release(self, keys: Sequence[str], worker: str, why: str = "interrupted") -> None:
        """Give held jobs back to the queue without counting the attempt (a runner stopping on purpose)."""
        now = time.time()
        with self._tx() as db:
            for key in keys:
                db.execute("UPDATE jobs SET state = 'queued', attempts = MAX(0, attempts - 1), last_error = ?, "
                           "worker = NULL, lease_until = NULL, updated = ? "
                           "WHERE key = ? AND state = 'running' AND worker = ?", (one_line_error(why), now, key, worker))

    def requeue_stale(self, max_attempts: int = 3, *, now: float | None = None,
                      failed: list[str] | None = None) -> list[str]:
        """Jobs left ``running`` by a dead holder (its pid gone on this host, or its lease expired) → queued again.

        A job that has already used ``max_attempts`` becomes ``failed`` instead (its key is appended to
        ``failed`` when given). Returns the keys touched.
        """
        now = time.time() if now is None else now
        host = socket.gethostname()
        touched = []
        with self._tx() as db:
            for row in db.execute("SELECT key, worker, lease_until, attempts FROM jobs WHERE state = 'running'")\
                    .fetchall():
                holder = row["worker"] or ""
                whost, _, pid = holder.rpartition(":")
                dead = whost == host and pid.isdigit() and not pid_alive(int(pid))
                expired = row["lease_until"] is not None and row["lease_until"] < now
                if not (dead or expired or not holder):
                    continue
                why = f"holder {holder or '?'} " + ("died" if dead else "stopped renewing its lease")
                state = FAILED if row["attempts"] >= max_attempts else QUEUED
                db.execute("UPDATE jobs SET state = ?, last_error = ?, worker = NULL, lease_until = NULL, "
                           "updated = ? WHERE key = ?", (state, one_line_error(f"interrupted: {why}"), now, row["key"]))
                touched.append(row["key"])
                if state == FAILED and failed is not None:
                    failed.append(row["key"])
        return touched

    def retry(self, keys: Sequence[str] | None = None) -> list[str]:
        """Failed jobs (all, or those whose key starts with one of ``keys``) → queued with attempts reset."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute("SELECT key FROM jobs WHERE state = 'failed'").fetchall()
            chosen = [r[0] for r in rows if keys is None or any(r[0].startswith(k) for k in keys)]
            for key in chosen:
                db.execute("UPDATE jobs SET state = 'queued', attempts = 0, finished = NULL, updated = ? "
                           "WHERE key = ?", (now, key))
        return chosen

    # -- reading ----------------------------------------------------------------------------------
    def get(self, key: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE key = ?", (key,))
        return self._job(rows[0]) if rows else None

    def find(self, prefix: str) -> list[Job]:
        """Jobs whose key starts with ``prefix`` (keys are shown shortened)."""
        return [self._job(r) for r in self._query("SELECT * FROM jobs WHERE key LIKE ? || '%' ORDER BY created",
                                                     (prefix,))]

    def jobs(self, state: str | None = None) -> list[Job]:
        if state is not None and state not in STATES:
            raise ConfigError(f"unknown job state {state!r}", f"use one of {', '.join(STATES)}")
        sql = "SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY created, key"
        return [self._job(r) for r in self._query(sql, (state,) if state else ())]

    def specs(self) -> list[dict[str, Any]]:
        """The distinct job specs in the store (as JSON objects; unreadable ones left out)."""
        out = []
        for (text,) in self._query("SELECT DISTINCT spec FROM jobs"):
            with contextlib.suppress(ValueError, TypeError):
                out.append(json.loads(text))
        return out

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zero when none)."""
        found = {r[0]: r[1] for r in self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        return {s: int(found.get(s, 0)) for s in STATES}

    # -- watcher sightings ------------------------------------------------------------------------
    def sighting(self, path: str, recipe: str) -> sqlite3.Row | None:
        """The last look the watcher took at ``path`` for ``recipe``: size, mtime (ns), seen, status, note."""
        rows = self._query("SELECT * FROM sightings WHERE path = ? AND recipe = ?", (path, recipe))
        return rows[0] if rows else None

    def record_sighting(self, path: str, recipe: str, size: int, mtime: int, status: str,
                        note: str | None = None, *, keep_seen: bool = False) -> None:
        """Remember a look at ``path``; ``keep_seen`` keeps the time of the first look at this size and mtime."""
        now = time.time()
        with self._tx() as db:
            if keep_seen:
                cur = db.execute("UPDATE sightings SET status = ?, note = ? WHERE path = ? AND recipe = ? "
                                 "AND size = ? AND mtime = ?", (status, note, path, recipe, size, mtime))
                if cur.rowcount:
                    return
            db.execute("INSERT OR REPLACE INTO sightings (path, recipe, size, mtime, seen, status, note) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (path, recipe, size, mtime, now, status, note))
