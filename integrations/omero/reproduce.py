"""``lpfm reproduce`` for OMERO results: re-run an image made by ``lpfm omero enhance`` and compare its pixels.

A result image carries its provenance twice (see :mod:`~lpfm_toolkit.integrations.omero.sink`): a key-value
annotation in the ``lpfm-toolkit/provenance`` namespace and the full record as a JSON file annotation. Both are
read and must agree; the record's source image is opened again on the same server, the engine rebuilt from the
recorded options, the recorded region, task and seed re-run into memory (nothing is written to the server), and
the checksum compared with the record — and the result's own pixels, read back from the server, with it too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from lpfm_toolkit.errors import ConnectionFailedError, LpfmError, ProvenanceError, SlideNotFoundError
from lpfm_toolkit.integrations.omero.session import (
    OmeroSession,
    OmeroSettings,
    describe_server_error,
    server_error_types,
)
from lpfm_toolkit.integrations.omero.sink import CHANNELS_KEY_SUFFIX, KEY, STATE
from lpfm_toolkit.provenance import NAMESPACE, PixelDigest, Provenance
from lpfm_toolkit.verify import MAX_SIDECAR_BYTES, ReproduceReport, require_comparable, rerun_digest

log = logging.getLogger(__name__)

#: decoded rows of the result held at once while its checksum is computed
_BAND_BYTES = 64 << 20
_PLANE = re.compile(r":z(\d+)t(\d+):")


def parse_image_ref(ref: str | int) -> tuple[str | None, int | None, int]:
    """``42`` or ``omero://host[:port]/image/42`` (as provenance records it) → ``(host, port, 42)``."""
    text = str(ref).strip()
    if text.isdigit():
        return None, None, int(text)
    url = urlparse(text)
    parts = [p for p in url.path.split("/") if p]
    if url.scheme != "omero" or not url.hostname or len(parts) != 2 or parts[0] != "image" or not parts[1].isdigit():
        raise SlideNotFoundError(
            f"{text!r} is not an OMERO image",
            "give an image id, or its URI as provenance records it: omero://HOST/image/ID",
        )
    try:
        port = url.port
    except ValueError as exc:
        raise SlideNotFoundError(f"{text!r} has an invalid port", "omero://HOST[:PORT]/image/ID") from exc
    return url.hostname, port, int(parts[1])


def parse_record(data: bytes, where: str) -> Provenance:
    """A result's provenance file, checked like a sidecar; a channels-mode key (``…:channels``) is understood."""
    suffix = ""
    try:
        loose = json.loads(data)
    except (ValueError, RecursionError):
        loose = None  # Provenance.parse says what is wrong with it
    key = loose.get("idempotency_key") if isinstance(loose, dict) else None
    if isinstance(key, str) and key.endswith(CHANNELS_KEY_SUFFIX):
        suffix = CHANNELS_KEY_SUFFIX
        data = json.dumps({**loose, "idempotency_key": key[: -len(suffix)]}).encode()
    prov = Provenance.parse(data, where)
    prov.idempotency_key += suffix
    return prov


def result_provenance(session: OmeroSession, image_id: int) -> Provenance:
    """The provenance of result image ``image_id``: its JSON file, checked against its key-value annotation.

    :class:`ProvenanceError` (one line) when the image has none, is an unfinished upload, lost its file, or when
    the two copies disagree.
    """
    from omero.gateway import FileAnnotationWrapper, MapAnnotationWrapper

    session.use_group_of(session.get_image(image_id))
    where = f"OMERO image {image_id}"

    def read(conn: Any) -> tuple[list[dict[str, str]], list[tuple[str, Any]]]:
        maps: list[dict[str, str]] = []
        files: list[tuple[str, Any]] = []
        for link in conn.getAnnotationLinks("Image", parent_ids=[image_id], ns=NAMESPACE):
            ann = link.getAnnotation()
            if isinstance(ann, MapAnnotationWrapper):
                maps.append({k: v for k, v in ann.getValue()})
            elif isinstance(ann, FileAnnotationWrapper):
                size = int(ann.getFileSize() or 0)
                if size > MAX_SIDECAR_BYTES:
                    files.append((str(ann.getFileName()), ValueError(f"{size} bytes, too large to be a record")))
                else:
                    files.append((str(ann.getFileName()), b"".join(ann.getFileInChunks())))
        return maps, files

    maps, files = session.call(read, f"read the provenance of image {image_id}")
    pairs = next((m for m in maps if KEY in m), None)
    if pairs is None and not files:
        raise ProvenanceError(
            f"{where} carries no lpfm provenance",
            "give the id of an image made by `lpfm omero enhance` (its key-value annotation lists "
            "lpfm.idempotency_key)",
        )
    if pairs is not None and pairs.get(STATE) != "complete":
        raise ProvenanceError(
            f"{where} is an unfinished lpfm upload (lpfm.state={pairs.get(STATE) or 'missing'})",
            "re-run the `lpfm omero enhance` command that made it; the next run deletes or completes it",
        )
    if not files:
        raise ProvenanceError(
            f"{where} lost its provenance file; its key-value annotation alone does not record the tiling and "
            "engine options a re-run needs",
            "make it again with `lpfm omero enhance ... --force`, then reproduce the new image",
        )
    records = []
    for name, data in files:
        if isinstance(data, Exception):
            raise ProvenanceError(f"{where}: its provenance file {name} is {data}", "it is not an lpfm record")
        records.append(parse_record(data, f"the provenance file {name} of {where}"))
    if pairs is not None:
        records = [r for r in records if r.idempotency_key == pairs[KEY]] or records
    if len(records) != 1:
        raise ProvenanceError(f"{where} carries {len(records)} provenance files", "keep only the one lpfm attached")
    prov = records[0]
    if pairs is not None:
        summary = {**prov.summary(), KEY: prov.idempotency_key}
        differ = sorted(k for k, v in summary.items() if k in pairs and pairs[k] != v)
        if differ:
            raise ProvenanceError(
                f"the key-value annotation and the provenance file of {where} disagree on {', '.join(differ[:6])}",
                "one was edited (OMERO.web); make the result again with `lpfm omero enhance ... --force`",
            )
    return prov


def stored_problems(session: OmeroSession, image_id: int, prov: Provenance) -> list[str]:
    """What is wrong with the result's pixels on the server (empty: they are the ones recorded).

    The enhanced channels are read back band by band and their checksum compared with ``output_sha256``. In
    ``channels`` mode the original channels beside them (pixel-replicated, in the source's pixel type) are
    compared with the source pixels the run read (``input_sha256``); the uncertainty channel has no checksum.
    """
    from lpfm_toolkit.integrations.omero.source import OmeroImageHandle

    out = prov.output
    shape = out.get("shape")
    n_orig = len(out.get("original_channels") or []) if out.get("mode") == "channels" else 0
    n_unc = 1 if out.get("uncertainty_channel") is not None else 0
    with OmeroImageHandle(session, image_id) as handle:
        lv = handle.levels[0]
        have = [lv.height, lv.width, len(handle.channel_names)]
        if isinstance(shape, list) and have != shape:
            return [
                f"its size is {'×'.join(map(str, have))} (height×width×channels), "
                f"{'×'.join(map(str, shape))} was written"
            ]
        if out.get("dtype") and str(handle.dtype) != out["dtype"]:
            return [f"its pixel type is {handle.dtype}, {out['dtype']} was written"]
        if not prov.output_sha256:
            return ["no checksum of its pixels was recorded, so they cannot be checked"]
        n_out = have[2] - n_orig - n_unc
        digest = PixelDigest(lv.height, lv.width, n_out, handle.dtype)
        _, _, rw, rh = prov.source["region"]
        scale = lv.width // rw if lv.width % rw == 0 and lv.height == rh * (lv.width // rw) else 0
        originals = None  # the original channels, one pixel of each scale×scale block: the source region itself
        if n_orig and scale and prov.input_sha256 and str(prov.source.get("dtype")) == str(handle.dtype):
            originals = PixelDigest(rh, rw, n_orig, handle.dtype)
        replicated = True
        rows = max(1, _BAND_BYTES // max(1, lv.width * have[2] * handle.dtype.itemsize))
        rows = max(1, scale) * max(1, rows // max(1, scale))  # bands start on a block of replicated rows
        try:
            for y in range(0, lv.height, rows):
                band = handle.read_region(0, 0, y, lv.width, min(rows, lv.height - y))
                digest.update(0, band[:, :, n_orig : n_orig + n_out])
                if originals is not None:
                    sub = band[::scale, ::scale, :n_orig]
                    originals.update(0, sub)
                    replicated &= bool((sub.repeat(scale, 0).repeat(scale, 1) == band[:, :, :n_orig]).all())
        except LpfmError as exc:
            return [f"its pixels cannot be read ({exc.message})"]
    problems = []
    if digest.hexdigest() != prov.output_sha256:
        problems.append("its pixels on the server differ from the recorded output sha256 (changed after it was made)")
    if originals is not None and (originals.hexdigest() != prov.input_sha256 or not replicated):
        problems.append("its original channels differ from the source pixels recorded (input sha256)")
    return problems


def reproduce_image(
    session: OmeroSession,
    image_id: int,
    *,
    model: str | None = None,
    trust_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReproduceReport:
    """Check result image ``image_id``'s pixels on the server, re-run it from its record, compare checksums.

    The source image is opened again (the plane recorded), the engine rebuilt from the recorded options after
    every other check; nothing is written to the server.
    """
    from lpfm_toolkit.integrations.omero.source import OmeroImageHandle

    uri = f"omero://{session.host}/image/{image_id}"
    try:
        prov = result_provenance(session, image_id)
        require_comparable(prov, f"OMERO image {image_id}")
        src = prov.source
        if src.get("system") != "omero":
            raise SlideNotFoundError(
                f"OMERO image {image_id} records a source on {src.get('system')!r}, not on OMERO",
                "reproduce it where its source is",
            )
        src_id = src.get("id")
        if not isinstance(src_id, int):
            src_id = parse_image_ref(str(src.get("uri")))[2]
        plane = _PLANE.search(str(src.get("fingerprint") or ""))
        z, t = (int(plane.group(1)), int(plane.group(2))) if plane else (0, 0)
        problems = stored_problems(session, image_id, prov)
        try:
            handle = OmeroImageHandle(session, src_id, z=z, t=t)
        except SlideNotFoundError as exc:
            raise SlideNotFoundError(
                f"the source of OMERO image {image_id}, image {src_id}, is gone or you cannot see it",
                "it must still be on the server (and readable by you) to reproduce the result",
            ) from exc
        with handle:
            notes = []
            if handle.fingerprint() != src.get("fingerprint"):
                notes.append(f"source image {src_id} is not the one the result was made from (re-imported?)")
            digest = rerun_digest(handle, prov, model=model, trust_pickle=trust_pickle, progress=progress)
    except server_error_types() as exc:
        raise ConnectionFailedError(
            f"OMERO failed while reproducing image {image_id} ({describe_server_error(exc)})",
            "try again; if it persists, ask your OMERO administrator",
        ) from exc
    return ReproduceReport(uri, prov.output_sha256, digest, problems, notes, kind="image")


def reproduce_uri(
    ref: str | int,
    *,
    session: OmeroSession | None = None,
    model: str | None = None,
    trust_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReproduceReport:
    """:func:`reproduce_image` of ``omero://host/image/ID`` (or an id, with ``session``).

    Without ``session`` one is opened to the URI's host with credentials from the environment only
    (``OMERO_SESSION_KEY`` / ``LPFM_OMERO_SESSION_KEY``, or ``OMERO_USER`` and ``OMERO_PASSWORD``) and the
    settings file, and closed again (a joined session is detached, never killed).
    """
    host, port, image_id = parse_image_ref(ref)
    if session is not None:
        if host is not None and host != session.host:
            raise ConnectionFailedError(
                f"{ref} is on {host}, but the session is connected to {session.host}",
                f"connect to {host} (--host {host}), or give the image id alone",
            )
        return reproduce_image(session, image_id, model=model, trust_pickle=trust_pickle, progress=progress)
    if host is None:
        raise ConnectionFailedError(f"OMERO image {image_id}: no server given", "give omero://HOST/image/ID")
    from lpfm_toolkit.config import load_settings

    settings = OmeroSettings.resolve(host=host, port=port, settings=load_settings())
    if not settings.session_key and not (settings.user and settings.password):
        raise ConnectionFailedError(
            f"no OMERO credentials to read {ref}",
            "set OMERO_SESSION_KEY (from `omero sessions key`), or OMERO_USER and OMERO_PASSWORD; or run "
            "`lpfm omero --host HOST --user NAME reproduce ID`",
        )
    with OmeroSession(settings) as opened, opened.keepalive():
        return reproduce_image(opened, image_id, model=model, trust_pickle=trust_pickle, progress=progress)
