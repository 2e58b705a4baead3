"""The job store: one SQLite row per work item, safe for several runners and resumable after a crash.

States: ``queued`` → ``running`` → ``done`` | ``failed`` (``running`` → ``queued`` again on a retryable
failure or when its holder died). A job's key is the pipeline's idempotency key, so adding the same work
twice adds nothing. Claims happen inside ``BEGIN IMMEDIATE`` transactions, so two runners on one store never
take the same job. The store lives with the coordinating process only; workers never touch it.
"""

from __future__ import annotations

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

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATES = (QUEUED, RUNNING, DONE, FAILED)
DEFAULT_STORE = "lpfm-jobs.sqlite"
SCHEMA_VERSION = 1
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


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


class JobStore:
    """A SQLite job store at ``path`` (WAL journal, busy timeout); one connection per instance.

    Give each thread its own ``JobStore``; an instance serialises its own calls with a lock.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ConfigError(f"job store {self.path} is a folder", "give a file name such as lpfm-jobs.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            with self._tx():
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise ConfigError(f"job store {self.path} was made by a newer lpfm-toolkit (schema {version})",
                                      "upgrade lpfm-toolkit, or use another --store")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"job store {self.path} cannot be opened: {exc}",
                              "is it an lpfm job store on a local disk (SQLite does not lock over NFS)?") from exc

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (``BEGIN IMMEDIATE``) so readers never upgrade and deadlock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

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
        return [Job.from_row(r) for r in rows]

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

    def requeue_stale(self, max_attempts: int = 3, *, now: float | None = None) -> list[str]:
        """Jobs left ``running`` by a dead holder (its pid gone on this host, or its lease expired) → queued again.

        A job that has already used ``max_attempts`` becomes ``failed`` instead. Returns the keys touched.
        """
        now = time.time() if now is None else now
        host = socket.gethostname()
        touched = []
        with self._tx() as db:
            for row in db.execute("SELECT key, worker, lease_until, attempts FROM jobs WHERE state = 'running'")\
                    .fetchall():
                holder = row["worker"] or ""
                whost, _, pid = holder.rpartition(":")
                dead = whost == host and pid.isdigit() and not _pid_alive(int(pid))
                expired = row["lease_until"] is not None and row["lease_until"] < now
                if not (dead or expired or not holder):
                    continue
                why = f"holder {holder or '?'} " + ("died" if dead else "stopped renewing its lease")
                state = FAILED if row["attempts"] >= max_attempts else QUEUED
                db.execute("UPDATE jobs SET state = ?, last_error = ?, worker = NULL, lease_until = NULL, "
                           "updated = ? WHERE key = ?", (state, one_line_error(f"interrupted: {why}"), now, row["key"]))
                touched.append(row["key"])
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
        return Job.from_row(rows[0]) if rows else None

    def find(self, prefix: str) -> list[Job]:
        """Jobs whose key starts with ``prefix`` (keys are shown shortened)."""
        return [Job.from_row(r) for r in self._query("SELECT * FROM jobs WHERE key LIKE ? || '%' ORDER BY created",
                                                     (prefix,))]

    def jobs(self, state: str | None = None) -> list[Job]:
        if state is not None and state not in STATES:
            raise ConfigError(f"unknown job state {state!r}", f"use one of {', '.join(STATES)}")
        sql = "SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY created, key"
        return [Job.from_row(r) for r in self._query(sql, (state,) if state else ())]

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
