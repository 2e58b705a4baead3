"""An OMERO session as a context manager over :class:`omero.gateway.BlitzGateway`.

Credentials come from flags, the environment (``OMERO_PASSWORD``, ``OMERO_SESSION_KEY`` or
``LPFM_OMERO_SESSION_KEY``) or the toolkit's settings (host, port, user, group, secure); the library never
prompts and never logs or keeps a password or session key. The session keeps itself alive during long jobs, reconnects once when the session is
lost, always closes, and restores the group it switched.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lpfm_toolkit.errors import ConnectionFailedError, LpfmError, SlideNotFoundError, require

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "lpfm-toolkit"
DEFAULT_PORT = 4064
KEEPALIVE_SECONDS = 60.0


class OmeroPermissionError(LpfmError, PermissionError):
    """The server refused an operation on an object (read-only group, someone else's data)."""


class SessionLostError(ConnectionFailedError):
    """The session expired or the connection dropped, and one reconnect did not bring it back."""


def omero_modules() -> Any:
    """``omero`` with its gateway loaded, or a clear "install lpfm-toolkit[omero]" error."""
    require("omero.gateway", "omero", "OMERO access")
    import omero

    return omero


@dataclass(frozen=True)
class OmeroSettings:
    """Where and how to connect; secrets are kept out of ``repr`` and never logged."""

    host: str | None = None
    port: int = DEFAULT_PORT
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    session_key: str | None = field(default=None, repr=False)
    group: str | None = None  # group name or id
    secure: bool = True

    @classmethod
    def resolve(cls, *, host: str | None = None, port: int | None = None, user: str | None = None,
                password: str | None = None, session_key: str | None = None, group: str | None = None,
                secure: bool | None = None, settings: Any = None,
                env: Mapping[str, str] | None = None) -> OmeroSettings:
        """Flags first, then ``OMERO_*`` variables, then the toolkit's settings (``omero_host`` …)."""
        env = os.environ if env is None else env

        def pick(flag: Any, env_name: str, setting: str, default: Any = None) -> Any:
            if flag is not None:
                return flag
            if env.get(env_name):
                return env[env_name]
            value = getattr(settings, setting, None) if settings is not None else None
            return default if value is None else value

        secure_value = pick(secure, "OMERO_SECURE", "omero_secure", True)
        if isinstance(secure_value, str):
            secure_value = secure_value.strip().lower() not in ("0", "false", "no", "off")
        port_value = pick(port, "OMERO_PORT", "omero_port", DEFAULT_PORT)
        try:
            port_value = int(port_value)
        except (TypeError, ValueError) as exc:
            raise ConnectionFailedError(f"OMERO port {port_value!r} is not a number", "use e.g. --port 4064") from exc
        return cls(
            host=pick(host, "OMERO_HOST", "omero_host"),
            port=port_value,
            user=pick(user, "OMERO_USER", "omero_user"),
            password=password if password is not None else env.get("OMERO_PASSWORD") or None,
            session_key=session_key if session_key is not None else (
                env.get("OMERO_SESSION_KEY") or env.get("LPFM_OMERO_SESSION_KEY") or None),
            group=pick(group, "OMERO_GROUP", "omero_group"),
            secure=bool(secure_value),
        )

    def check(self) -> None:
        """Raise unless there is enough to log in: a host, and a session key or a user with a password."""
        if not self.host:
            raise ConnectionFailedError("no OMERO server given", "pass --host or set OMERO_HOST (or omero_host)")
        if not self.session_key and not (self.user and self.password):
            raise ConnectionFailedError(
                "no OMERO credentials given",
                "pass --user and set OMERO_PASSWORD, or set OMERO_SESSION_KEY to an existing session",
            )


def _make_gateway(settings: OmeroSettings) -> Any:
    """A new, not yet connected BlitzGateway (tests replace this function)."""
    omero_modules()
    from omero.gateway import BlitzGateway

    if settings.session_key:
        return BlitzGateway(host=settings.host, port=settings.port, secure=settings.secure, useragent=USER_AGENT)
    return BlitzGateway(settings.user, settings.password, host=settings.host, port=settings.port,
                        secure=settings.secure, useragent=USER_AGENT)


def _exception_types(*names: str) -> tuple[type[BaseException], ...]:
    """Exception classes by dotted name (``Ice.ConnectionLostException``), skipping unknown ones."""
    import importlib

    out: list[type[BaseException]] = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        out.append(cls)
    return tuple(out)


def session_lost_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the session or connection is gone": worth one reconnect."""
    return _exception_types(
        "Ice.ConnectionLostException", "Ice.SocketException", "Ice.TimeoutException",
        "Ice.CommunicatorDestroyedException", "Ice.ObjectNotExistException", "Ice.ConnectionRefusedException",
        "Ice.ConnectFailedException", "omero.SessionTimeoutException", "omero.RemovedSessionException",
        "omero.SessionException", "Glacier2.SessionNotExistException", "omero.ClientError",
    )


def permission_types() -> tuple[type[BaseException], ...]:
    return _exception_types("omero.SecurityViolation")


def server_error_types() -> tuple[type[BaseException], ...]:
    """Any error the server or Ice reports (as opposed to a bug in our code)."""
    return _exception_types("omero.ServerError", "Ice.Exception")


def memory_limit_types() -> tuple[type[BaseException], ...]:
    return _exception_types("Ice.MemoryLimitException")


def is_session_lost(exc: BaseException) -> bool:
    return isinstance(exc, session_lost_types())


def describe_server_error(exc: BaseException) -> str:
    """A short text for an Ice/OMERO exception (their ``str`` is often empty or a whole stack)."""
    msg = getattr(exc, "message", None) or getattr(exc, "reason", None) or str(exc)
    msg = " ".join(str(msg).split())[:300]
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def permission_error(exc: BaseException, action: str) -> OmeroPermissionError:
    return OmeroPermissionError(
        f"OMERO refused to {action} ({describe_server_error(exc)})",
        "check that your group allows you to write there (read-write, or your own data), or choose another "
        "dataset with --target-dataset",
    )


class OmeroSession:
    """A connected BlitzGateway that is kept alive, reconnected once, and always closed.

    Use as ``with OmeroSession(settings) as session: session.conn …``. A session opened from an existing
    session key (OMERO.web, an OMERO.script) is detached on exit, never killed.
    """

    def __init__(self, settings: OmeroSettings | None = None, *, conn: Any = None, owns: bool | None = None,
                 keepalive_seconds: float = KEEPALIVE_SECONDS, max_reconnects: int = 3) -> None:
        if settings is None and conn is None:
            raise ConnectionFailedError("an OmeroSession needs settings or a connected gateway")
        self.settings = settings
        self.conn = conn
        # a gateway handed in (by an OMERO.script) belongs to the caller: never close it
        self.owns = (conn is None) if owns is None else owns
        self.keepalive_seconds = keepalive_seconds
        self.max_reconnects = max_reconnects  # per session; each loss gets exactly one attempt
        self.reconnects = 0
        self._saved_group: Any = None  # the caller's group context, restored on close
        self._active_group: int | None = None  # group we work in (re-applied after a reconnect)
        self._switched = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> OmeroSession:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Connect (unless a connected gateway was given) and switch to the configured group."""
        if self.conn is None:
            self._connect()
        try:
            if self.settings is not None and self.settings.group:
                self.switch_group(self.settings.group)
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        assert self.settings is not None
        self.settings.check()
        conn = _make_gateway(self.settings)
        try:
            ok = conn.connect(sUuid=self.settings.session_key) if self.settings.session_key else conn.connect()
        except Exception as exc:  # Ice raises its own types for refused/unreachable servers
            raise ConnectionFailedError(
                f"could not reach OMERO at {self.settings.host}:{self.settings.port} ({describe_server_error(exc)})",
                "check host, port and --insecure/--secure, and that the server is up",
            ) from exc
        if not ok:
            why = "the session key is not valid (expired or closed)" if self.settings.session_key else \
                f"login as {self.settings.user!r} was refused"
            raise ConnectionFailedError(f"OMERO at {self.settings.host}: {why}",
                                        "log in again (omero login) or check user name and password")
        self.conn = conn
        log.info("connected to OMERO at %s:%s", self.settings.host, self.settings.port)

    def close(self) -> None:
        """Stop keep-alive, restore the group, close the connection we opened (detach from a joined session)."""
        self.stop_keepalive()
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            self._restore_group(conn)
        finally:
            if self.owns:
                joined = bool(self.settings is not None and self.settings.session_key)
                try:
                    conn.close(hard=not joined)  # never kill a session someone else logged in
                except Exception as exc:
                    log.warning("closing the OMERO connection failed: %s", describe_server_error(exc))
            else:
                self.conn = conn  # the caller's gateway stays theirs and open

    # -- groups ----------------------------------------------------------------------------------------------
    # Groups are switched through the gateway's call context (SERVICE_OPTS), not setGroupForSession: the
    # latter closes every stateful service (an open RawPixelsStore mid-job) and outlives a joined session.
    def switch_group(self, group: str | int) -> None:
        """Make later calls act in ``group`` (name or id, -1 for all groups); :meth:`close` switches back."""
        gid = self._group_id(group)
        if gid != -1:
            ctx = self.call(lambda c: c.getEventContext(), "read your session")
            member_of = {int(g) for g in (ctx.memberOfGroups or [])}
            if gid not in member_of and not getattr(ctx, "isAdmin", False):
                raise OmeroPermissionError(f"you are not a member of OMERO group {group!r}",
                                           "choose one of your groups with --group")
        opts = self.conn.SERVICE_OPTS
        if not self._switched:
            self._saved_group = opts.getOmeroGroup()
            self._switched = True
        opts.setOmeroGroup(gid)
        self._active_group = gid
        log.debug("OMERO calls now act in group %s", gid)

    def use_group_of(self, obj: Any) -> None:
        """Make later calls act in the group of ``obj`` (a wrapper), e.g. to write next to an original."""
        # the raw model's group id: DetailsWrapper.getGroup() would load the group with another call
        self.switch_group(int(obj._obj.getDetails().getGroup().getId().getValue()))

    def _restore_group(self, conn: Any) -> None:
        if not self._switched:
            return
        conn.SERVICE_OPTS.setOmeroGroup(self._saved_group)  # None removes the key
        self._switched = False
        log.debug("OMERO group context restored to %s", self._saved_group)

    def _group_id(self, group: str | int) -> int:
        if isinstance(group, int) or str(group).isdigit():
            return int(group)
        found = self.conn.getObject("ExperimenterGroup", attributes={"name": str(group)})
        if found is None:
            raise SlideNotFoundError(f"OMERO group {group!r} does not exist", "check the name with omero group list")
        return int(found.getId())

    # -- keep-alive and reconnection -------------------------------------------------------------------------
    def start_keepalive(self) -> None:
        """Ping the server from a daemon thread every ``keepalive_seconds`` until :meth:`stop_keepalive`."""
        if self._thread is not None or self.keepalive_seconds <= 0:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.keepalive_seconds):
                conn = self.conn
                if conn is None:
                    return
                try:
                    if not conn.keepAlive():
                        log.warning("OMERO keep-alive failed; the next call will reconnect")
                except Exception as exc:
                    log.warning("OMERO keep-alive failed: %s", describe_server_error(exc))

        self._thread = threading.Thread(target=loop, name="lpfm-omero-keepalive", daemon=True)
        self._thread.start()

    def stop_keepalive(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @contextmanager
    def keepalive(self) -> Iterator[OmeroSession]:
        """Keep the session alive for the duration of a ``with`` block (long jobs)."""
        started = self._thread is None
        self.start_keepalive()
        try:
            yield self
        finally:
            if started:
                self.stop_keepalive()

    def reconnect(self, cause: BaseException | None = None) -> None:
        """Reconnect once after a lost session; raise :class:`SessionLostError` when that fails too.

        Wrappers fetched before the reconnect still point at the dead gateway: fetch again through ``conn``.
        """
        with self._lock:
            why = describe_server_error(cause) if cause is not None else "session lost"
            if self.settings is None or self.reconnects >= self.max_reconnects:
                raise SessionLostError(f"the OMERO session was lost ({why})",
                                       "re-run the same command: finished results are kept and skipped") from cause
            self.reconnects += 1
            log.warning("OMERO session lost (%s); reconnecting once", why)
            old, self.conn = self.conn, None
            if old is not None:
                try:
                    old.close(hard=False)
                except Exception as exc:  # a dead connection often fails to close; that is fine
                    log.debug("closing the lost connection: %s", describe_server_error(exc))
            try:
                self._connect()
            except ConnectionFailedError as exc:
                raise SessionLostError(f"the OMERO session was lost ({why}) and reconnecting failed: {exc.message}",
                                       "log in again and re-run: finished results are kept and skipped") from cause
            if self._active_group is not None:
                self._switched = False  # a fresh gateway: nothing of the caller's to restore
                self.switch_group(self._active_group)

    def call(self, func: Callable[[Any], T], what: str) -> T:
        """``func(conn)``, reconnecting once if the session was lost; permission errors become clear errors."""
        for attempt in (0, 1):
            try:
                return func(self.conn)
            except permission_types() as exc:
                raise permission_error(exc, what) from exc
            except Exception as exc:
                if attempt == 0 and is_session_lost(exc):
                    self.reconnect(exc)
                    continue
                if is_session_lost(exc):
                    raise SessionLostError(f"the OMERO session was lost while trying to {what} "
                                           f"({describe_server_error(exc)})", "re-run the same command") from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- conveniences ----------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        if self.settings is not None and self.settings.host:
            return self.settings.host
        return str(getattr(self.conn, "host", None) or "omero")

    def find_any_group(self, obj_type: str, obj_id: int) -> Any:
        """``conn.getObject(obj_type, obj_id)`` searched across all your groups (None when not visible)."""

        def fetch(conn: Any) -> Any:
            opts = conn.SERVICE_OPTS
            previous = opts.getOmeroGroup()
            opts.setOmeroGroup(-1)
            try:
                return conn.getObject(obj_type, int(obj_id))
            finally:
                opts.setOmeroGroup(previous)  # None removes the key

        return self.call(fetch, f"read {obj_type} {obj_id}")

    def get_image(self, image_id: int) -> Any:
        """The image wrapper, from any of your groups; a clear error when it is not there."""
        image = self.find_any_group("Image", image_id)
        if image is None:
            raise SlideNotFoundError(f"OMERO image {image_id} does not exist or you cannot see it",
                                     "check the id in OMERO.web and your group membership")
        return image

    def get_dataset(self, dataset_id: int) -> Any:
        """The dataset wrapper, from any of your groups."""
        ds = self.find_any_group("Dataset", dataset_id)
        if ds is None:
            raise SlideNotFoundError(f"OMERO dataset {dataset_id} does not exist or you cannot see it",
                                     "check the id in OMERO.web and your group membership")
        return ds
