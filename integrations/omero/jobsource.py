"""OMERO images as job sources (``kind = "omero"``) and the requests OMERO.web users leave for them.

A user asks for an enhancement without a terminal by tagging an image ``lpfm:<prompt>`` (a TagAnnotation,
e.g. ``lpfm:sr x2``) or by giving it the key-value pair ``lpfm.enhance = <prompt>``. :func:`find_requests`
finds those; :func:`omero_specs` turns images, datasets or projects into job specs; the job store queues them
by idempotency key, so finding the same request again queues nothing. A worker reads the image and writes
the result back as a new OMERO image exactly as ``lpfm omero enhance`` does (:class:`OmeroSink`); the
coordinator then marks the original for OMERO.web users: the tag ``lpfm:done`` or ``lpfm:failed`` and a
key-value annotation (namespace ``lpfm-toolkit/state``) with the prompt, the results or the reason. The
original's pixels are never touched.

Credentials come only from the environment (``OMERO_USER`` + ``OMERO_PASSWORD``, or ``OMERO_SESSION_KEY`` /
``LPFM_OMERO_SESSION_KEY``) and the settings file (host, port, group): job specs hold the server's address,
never a secret. Each process (each thread) keeps one session per server, kept alive between jobs and
re-established when the server dropped it.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlparse

from lpfm_toolkit.errors import ConfigError, LpfmError
from lpfm_toolkit.integrations.omero.session import (
    OmeroSession,
    OmeroSettings,
    describe_server_error,
)

log = logging.getLogger(__name__)

#: a TagAnnotation ``lpfm:<prompt>`` on an image asks for that enhancement
TAG_PREFIX = "lpfm:"
#: a key-value pair ``lpfm.enhance = <prompt>`` on an image asks for it too
MAP_KEY = "lpfm.enhance"
DONE_TAG, FAILED_TAG = "lpfm:done", "lpfm:failed"
#: namespace of the state annotations written on originals (tags and key-value pairs)
STATE_NS = "lpfm-toolkit/state"


# -- sessions kept per process and thread ------------------------------------------------------------------------
_local = threading.local()
_all_sessions: list[OmeroSession] = []
_all_lock = threading.Lock()


def server_uri(settings: OmeroSettings) -> str:
    """``omero://host:port``: how job specs name a server (never with credentials)."""
    return f"omero://{settings.host}:{settings.port}"


def settings_for(uri: str, env: Any = None) -> OmeroSettings:
    """Connection settings for the server ``uri`` of a job: credentials from the environment only."""
    from lpfm_toolkit.config import load_settings

    parsed = urlparse(uri)
    if parsed.scheme != "omero" or not parsed.hostname:
        raise ConfigError(f"job source {uri!r} is not an OMERO server", "expected omero://host:port")
    return OmeroSettings.resolve(host=parsed.hostname, port=parsed.port, settings=load_settings(), env=env)


def session_for(uri: str) -> OmeroSession:
    """This thread's open session to ``uri``: opened on first use (keep-alive running), re-opened when dropped."""
    sessions: dict[str, OmeroSession] = getattr(_local, "sessions", None) or {}
    _local.sessions = sessions
    session = sessions.get(uri)
    if session is not None and not _alive(session):
        log.warning("the OMERO session to %s was dropped; logging in again", uri)
        _close_quietly(session)
        session = None
    if session is None:
        session = OmeroSession(settings_for(uri))
        session.open()
        session.start_keepalive()
        sessions[uri] = session
        with _all_lock:
            _all_sessions.append(session)
    return session


def _alive(session: OmeroSession) -> bool:
    conn = session.conn
    if conn is None:
        return False
    try:
        return bool(conn.keepAlive())
    except Exception as exc:  # noqa: BLE001 - any failure of the ping means: open a new session
        log.debug("keep-alive failed: %s", describe_server_error(exc))
        return False


def _close_quietly(session: OmeroSession) -> None:
    try:
        session.close()
    except Exception as exc:  # noqa: BLE001 - a dead connection may not close cleanly
        log.debug("closing an OMERO session: %s", describe_server_error(exc))
    with _all_lock:
        if session in _all_sessions:
            _all_sessions.remove(session)


def close_sessions() -> None:
    """Close every session this process opened for jobs (joined sessions are detached, never killed)."""
    with _all_lock:
        sessions = list(_all_sessions)
    for s in sessions:
        _close_quietly(s)
    _local.sessions = {}


atexit.register(close_sessions)


# -- the job source -------------------------------------------------------------------------------------------
class OmeroSource:
    """``source`` = ``omero://host:port``, ``entry`` = the image ID; results are new OMERO images."""

    def open(self, spec: Any) -> Any:
        from lpfm_toolkit.integrations.omero.source import OmeroImageHandle

        return OmeroImageHandle(session_for(spec.source), int(spec.entry))

    def output_dir(self, spec: Any) -> None:
        return None

    def sink(self, spec: Any, handle: Any) -> Any:
        from lpfm_toolkit.integrations.omero.sink import OmeroSink

        return OmeroSink(handle.session, handle, mode=spec.output_mode, dataset=spec.target_dataset)

    def finalize(self, spec: Any, result: Any) -> str:
        mark_original(session_for(spec.source), int(spec.entry), spec.prompt, "done", results=result.uri)
        return str(result.uri)

    def failed(self, spec: Any, error: str) -> None:
        mark_original(session_for(spec.source), int(spec.entry), spec.prompt, "failed", reason=error)


# -- marking originals --------------------------------------------------------------------------------------------
def _links(session: OmeroSession, image_id: int, ns: str | None) -> list[Any]:
    return session.call(
        lambda c: list(c.getAnnotationLinks("Image", parent_ids=[image_id], ns=ns)),
        f"read the annotations of image {image_id}",
    )


def state_of(session: OmeroSession, image_id: int) -> dict[str, dict[str, str]]:
    """The recorded states of an original, by prompt: ``{"sr x2": {"lpfm.state": "done", …}}``."""
    from omero.gateway import MapAnnotationWrapper

    out: dict[str, dict[str, str]] = {}
    session.use_group_of(session.get_image(image_id))
    for link in _links(session, image_id, STATE_NS):
        ann = link.getAnnotation()
        if isinstance(ann, MapAnnotationWrapper):
            pairs = dict((k, v) for k, v in ann.getValue())
            if "lpfm.prompt" in pairs:
                out[pairs["lpfm.prompt"]] = pairs
    return out


def _tag(session: OmeroSession, text: str) -> Any:
    """The tag ``text`` in our namespace owned by this user (made once)."""
    import omero.model
    from omero.rtypes import rstring

    def find(conn: Any) -> Any:
        me = conn.getUserId()
        for tag in conn.getObjects("TagAnnotation", attributes={"textValue": text}):
            if tag.getNs() == STATE_NS and int(tag._obj.getDetails().getOwner().getId().getValue()) == me:
                return tag._obj
        new = omero.model.TagAnnotationI()
        new.setTextValue(rstring(text))
        new.setNs(rstring(STATE_NS))
        new.setDescription(rstring("lpfm-toolkit: the state of requested enhancements (see the key-value pairs)"))
        return new  # saved with its first link

    return session.call(find, f"find or make the tag {text}")


def mark_original(
    session: OmeroSession, image_id: int, prompt: str, state: str, *, results: str = "", reason: str = ""
) -> None:
    """Record ``state`` (``done``/``failed``) of ``prompt`` on the original: tag + key-value pairs; no pixels.

    The tags follow all prompts of the image: ``lpfm:done`` while one is done, ``lpfm:failed`` while one is
    failed; the key-value annotation of each prompt says which, with the results or the reason.
    """
    import omero.model
    from omero.gateway import MapAnnotationWrapper, TagAnnotationWrapper
    from omero.rtypes import rstring

    image = session.get_image(image_id)
    session.use_group_of(image)  # annotate in the image's group
    pairs = {"lpfm.prompt": prompt, "lpfm.state": state}
    if results:
        pairs["lpfm.results"] = results
    if reason:
        pairs["lpfm.reason"] = reason[:1000]
    links = _links(session, image_id, STATE_NS)
    maps = {}
    tags = {}
    for link in links:
        ann = link.getAnnotation()
        if isinstance(ann, MapAnnotationWrapper):
            values = dict((k, v) for k, v in ann.getValue())
            maps[values.get("lpfm.prompt", "")] = (ann, values)
        elif isinstance(ann, TagAnnotationWrapper):
            tags[ann.getValue()] = link
    update = []

    def save_map(conn: Any) -> None:
        if prompt in maps:
            ann = maps[prompt][0]._obj
            ann.setMapValue([omero.model.NamedValue(k, v) for k, v in pairs.items()])
            conn.getUpdateService().saveObject(ann, conn.SERVICE_OPTS)
        else:
            ann = omero.model.MapAnnotationI()
            ann.setNs(rstring(STATE_NS))
            ann.setMapValue([omero.model.NamedValue(k, v) for k, v in pairs.items()])
            link = omero.model.ImageAnnotationLinkI()
            link.setParent(omero.model.ImageI(image_id, False))
            link.setChild(ann)
            conn.getUpdateService().saveObject(link, conn.SERVICE_OPTS)

    session.call(save_map, f"record the state of image {image_id}")
    states = {p: v.get("lpfm.state") for p, (_, v) in maps.items()}
    states[prompt] = state
    wanted = {DONE_TAG: "done" in states.values(), FAILED_TAG: "failed" in states.values()}
    for text, want in wanted.items():
        if want and text not in tags:
            tag = _tag(session, text)

            def link_tag(conn: Any, tag: Any = tag) -> None:
                link = omero.model.ImageAnnotationLinkI()
                link.setParent(omero.model.ImageI(image_id, False))
                link.setChild(tag if tag.getId() is None else omero.model.TagAnnotationI(tag.getId(), False))
                conn.getUpdateService().saveObject(link, conn.SERVICE_OPTS)

            session.call(link_tag, f"tag image {image_id} {text}")
        elif not want and text in tags:
            update.append(tags[text])
    for link in update:  # a stale state tag (e.g. failed, now done): unlink it, the tag itself stays
        link_id = int(link.getId())
        session.call(
            lambda c, i=link_id: c.deleteObjects("ImageAnnotationLink", [i], wait=True), f"untag image {image_id}"
        )
    log.info("image %s: %s is %s", image_id, prompt, state)


# -- finding work ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One enhancement asked for on an image: by a tag ``lpfm:<prompt>`` or a pair ``lpfm.enhance = <prompt>``."""

    image_id: int
    prompt: str
    how: str  # "tag" | "key-value"


def find_requests(session: OmeroSession, *, include_handled: bool = False) -> list[Request]:
    """Images (visible to this user, in the session's group context) that ask for an enhancement.

    Requests whose prompt the original already records as done or failed are left out unless
    ``include_handled`` (the job store would not queue them again anyway; this saves opening them).
    """
    from omero.gateway import MapAnnotationWrapper

    def by_tags(conn: Any) -> list[Request]:
        found = []
        for tag in conn.getObjects("TagAnnotation"):
            text = str(tag.getValue() or "")
            if not text.startswith(TAG_PREFIX) or text in (DONE_TAG, FAILED_TAG) or tag.getNs() == STATE_NS:
                continue
            prompt = text[len(TAG_PREFIX) :].strip()
            if prompt:
                found += [
                    Request(int(im.getId()), prompt, "tag")
                    for im in conn.getObjectsByAnnotations("Image", [int(tag.getId())])
                ]
        return found

    def by_pairs(conn: Any) -> list[Request]:
        found = []
        ids = sorted({int(im.getId()) for im in conn.getObjectsByMapAnnotations("Image", key=MAP_KEY)})
        for link in conn.getAnnotationLinks("Image", parent_ids=ids) if ids else []:
            ann = link.getAnnotation()
            if isinstance(ann, MapAnnotationWrapper) and ann.getNs() != STATE_NS:
                for k, v in ann.getValue():
                    if k == MAP_KEY and v.strip():
                        found.append(Request(int(link.getParent().getId()), v.strip(), "key-value"))
        return found

    def everywhere(func: Any) -> Any:
        """``func`` across all your groups (or the configured group): earlier jobs may have switched it."""

        def run(conn: Any) -> Any:
            opts = conn.SERVICE_OPTS
            previous = opts.getOmeroGroup()
            group = session.settings.group if session.settings is not None else None
            opts.setOmeroGroup(session._group_id(group) if group else -1)
            try:
                return func(conn)
            finally:
                opts.setOmeroGroup(previous)

        return run

    requests = session.call(everywhere(by_tags), "look for images tagged lpfm:<prompt>")
    requests += session.call(everywhere(by_pairs), f"look for images with the key {MAP_KEY}")
    requests = sorted(set(requests), key=lambda r: (r.image_id, r.prompt, r.how))
    if include_handled:
        return requests
    out = []
    states: dict[int, dict[str, dict[str, str]]] = {}
    for r in requests:
        if r.image_id not in states:
            states[r.image_id] = state_of(session, r.image_id)
        if states[r.image_id].get(r.prompt, {}).get("lpfm.state") in ("done", "failed"):
            continue
        out.append(r)
    return out


def image_ids_of(
    session: OmeroSession, *, images: Iterable[int] = (), datasets: Iterable[int] = (), projects: Iterable[int] = ()
) -> list[int]:
    """Image IDs of images, datasets and projects (in order, each once; lpfm results left out)."""
    from lpfm_toolkit.integrations.omero.workflow import dataset_image_ids

    ids = [int(i) for i in images]
    ds = [int(d) for d in datasets]
    for pid in projects:
        project = session.find_any_group("Project", int(pid))
        if project is None:
            from lpfm_toolkit.errors import SlideNotFoundError

            raise SlideNotFoundError(
                f"OMERO project {pid} does not exist or you cannot see it",
                "check the id in OMERO.web and your group membership",
            )
        ds += session.call(
            lambda c, p=int(pid): sorted(int(d.getId()) for d in c.getObjects("Dataset", opts={"project": p})),
            f"list the datasets of project {pid}",
        )
    for d in ds:
        ids += dataset_image_ids(session, d)
    seen: set[int] = set()
    return [i for i in ids if not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]


def omero_specs(
    session: OmeroSession,
    template: Any,
    *,
    image_ids: Sequence[int] = (),
    requests: Sequence[Request] = (),
    prompt: str | None = None,
) -> list[Any]:
    """Job specs for ``image_ids`` (with ``prompt``) and for ``requests`` (with their own prompts)."""
    if image_ids and not prompt:
        raise ConfigError("images given without a prompt", "say what to do with them, e.g. -p 'sr x2'")
    assert session.settings is not None
    uri = server_uri(session.settings)
    base = {"kind": "omero", "source": uri, "out": "", "region": None}
    specs = [replace(template, **base, entry=str(i), prompt=prompt or "") for i in image_ids]
    specs += [replace(template, **base, entry=str(r.image_id), prompt=r.prompt) for r in requests]
    return specs


def queue(store: Any, specs: Sequence[Any]) -> Any:
    """Add ``specs`` to ``store`` (idempotent by key); a request that cannot be queued is marked failed."""
    from lpfm_toolkit.jobs import add_jobs

    report = add_jobs(store, specs, strict=False)
    by_label = {}
    for spec in specs:
        by_label[f"{spec.source}#{spec.entry}"] = spec
    for where, error in report.rejected:
        spec = by_label.get(where)
        if spec is None:
            continue
        try:
            mark_original(session_for(spec.source), int(spec.entry), spec.prompt, "failed", reason=error)
        except (LpfmError, *_server_errors()) as exc:
            log.warning("could not mark image %s failed: %s", spec.entry, exc)
    return report


def _server_errors() -> tuple[type[BaseException], ...]:
    from lpfm_toolkit.integrations.omero.session import server_error_types

    return server_error_types()


def watch_omero(store: Any, template: Any, settings: OmeroSettings) -> Any:
    """Queue every request found on the server (tags and key-value pairs); already queued work adds nothing."""
    session = session_for(server_uri(settings))
    return queue(store, omero_specs(session, template, requests=find_requests(session)))
