"""Trust, but check: whose a file is, whether an output is intact, and re-running an output from its record.

An OME-TIFF output carries its provenance twice — in the ``.lpfm.json`` sidecar and in its OME-XML — and,
once complete, the sidecar also records the checksum of every pyramid level as stored and decoded
(``stored``). :func:`check_output` compares all of that with the file: ``quick`` reads only the header
(levels, sizes, tile extents, file size, sidecar vs embedded record); ``full`` also decodes every level.
:func:`target_owner` decides whether a path may be written: lpfm replaces only its own outputs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpfm_toolkit.errors import (
    ConfigError,
    CorruptImageError,
    ModelError,
    OutputExistsError,
    ProvenanceError,
    SlideNotFoundError,
)
from lpfm_toolkit.provenance import DIGEST_SCHEME, NAMESPACE, PixelDigest, Provenance
from lpfm_toolkit.sinks.base import OutputRef, OutputSpec, Sink, SinkWriter

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".lpfm.json"
JSON_NAMESPACE = NAMESPACE + "/json"  # as the OME-TIFF writer embeds it
TIFF_SUFFIXES = (".ome.tiff", ".ome.tif")
#: a sidecar is a few kB; anything this large is not one (and is not read into memory)
MAX_SIDECAR_BYTES = 16 << 20
#: compressions whose decoded pixels are the pixels that were written
LOSSLESS = ("zlib", "zstd", "lzw", "none", "deflate", "adobe_deflate")
#: rows decoded at a time when checksumming a stored level (bounds memory on big outputs)
_BAND_ROWS = 512
_INFLIGHT_BYTES = 32 << 20  # decoded pieces held at once by level_digests
_PIECE_BYTES = 8 << 20  # one piece decoded and hashed at a time (a band of _BAND_ROWS rows, cut into columns)
_PIECE_ALIGN = 1024  # piece widths: whole 512-px tiles and whole DIGEST_BLOCK columns


def sidecar_for(tiff: Path) -> Path:
    """``x.ome.tiff`` / ``x.ome.tif`` → ``x.lpfm.json`` (the writer's own rule)."""
    from lpfm_toolkit.sinks.ometiff import sidecar_path

    return sidecar_path(tiff)


def uncertainty_for(tiff: Path) -> Path:
    """Where the uncertainty map of ``tiff`` goes (``x.uncertainty.ome.tiff``; the writer's own rule)."""
    from lpfm_toolkit.sinks.ometiff import uncertainty_path

    return uncertainty_path(tiff)


def read_sidecar(path: Path) -> Provenance:
    """The record in a ``.lpfm.json`` sidecar, checked; :class:`ProvenanceError` says what is wrong with it."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise SlideNotFoundError(f"{path} does not exist", "give an lpfm output or its .lpfm.json") from exc
    if not path.is_file():
        raise ProvenanceError(f"{path.name} is not a regular file", "give an lpfm output or its .lpfm.json")
    if st.st_size > MAX_SIDECAR_BYTES:
        raise ProvenanceError(
            f"{path.name} is {st.st_size} bytes, too large to be an lpfm sidecar",
            "give the .lpfm.json written beside an output",
        )
    return Provenance.parse(path.read_bytes(), path.name)


def read_embedded(tiff: Path) -> Provenance | None:
    """The record inside ``tiff``'s OME-XML (None when it has none); :class:`CorruptImageError` if unreadable."""
    import xml.etree.ElementTree as ET

    import tifffile

    try:
        with tifffile.TiffFile(tiff) as tif:
            xml = tif.pages[0].description if tif.pages else ""
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on damaged files
        raise CorruptImageError(
            f"{tiff.name} is not a readable TIFF ({type(exc).__name__})", "it is damaged or not an image"
        ) from exc
    if not xml or "<OME" not in xml[:4096]:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("CommentAnnotation") and el.get("Namespace") == JSON_NAMESPACE:
            value = next((c.text for c in el if c.tag.endswith("Value")), None)
            if value:
                return Provenance.parse(value, f"the provenance inside {tiff.name}")
    return None


def disagreements(a: Provenance, b: Provenance) -> list[str]:
    """Fields where two copies of one record differ (``stored`` is only ever in the sidecar)."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for key in sorted(set(da) | set(db)):
        if key == "stored" or da.get(key) == db.get(key):
            continue
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
            out.extend(f"{key}.{k}" for k in sub)
        else:
            out.append(key)
    return out


@dataclass
class OutputRecord:
    """An output's two provenance copies and where they differ."""

    tiff: Path
    sidecar: Provenance | None
    embedded: Provenance | None
    differences: list[str] = field(default_factory=list)

    @property
    def provenance(self) -> Provenance:
        prov = self.sidecar or self.embedded
        assert prov is not None  # read_output never builds a record without one
        return prov


def read_output(path: str | Path) -> OutputRecord:
    """Both provenance copies of an output (give the ``.ome.tiff`` or its ``.lpfm.json``)."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise SlideNotFoundError(f"{p} does not exist", "give an lpfm output (.ome.tiff) or its .lpfm.json sidecar")
    if p.name.endswith(".json"):
        side: Provenance | None = read_sidecar(p)
        assert side is not None
        stem = p.name[: -len(SIDECAR_SUFFIX)] if p.name.endswith(SIDECAR_SUFFIX) else p.stem
        # the image beside it: same stem, either OME-TIFF suffix; else the path it recorded
        tiff = next(
            (p.with_name(stem + s) for s in TIFF_SUFFIXES if p.with_name(stem + s).exists()),
            Path(str(side.output.get("uri") or p.with_name(stem + ".ome.tiff"))),
        )
        embedded = read_embedded(tiff) if tiff.is_file() else None
    else:
        tiff = p
        if not p.is_file():
            raise ProvenanceError(f"{p.name} is not a regular file", "give an lpfm output (.ome.tiff)")
        side_path = sidecar_for(p)
        side = read_sidecar(side_path) if side_path.exists() else None
        embedded = read_embedded(p)
        if side is None and embedded is None:
            raise ProvenanceError(f"{p.name} carries no lpfm provenance", "only outputs written by lpfm have one")
    rec = OutputRecord(tiff, side, embedded)
    if side is not None and embedded is not None:
        rec.differences = disagreements(side, embedded)
    return rec


def outputs_in(folder: Path) -> list[Path]:
    """The lpfm outputs under ``folder`` (any depth): OME-TIFFs with a sidecar beside them, uncertainty maps aside."""
    found = []
    for side in sorted(folder.rglob("*" + SIDECAR_SUFFIX)):
        stem = side.name[: -len(SIDECAR_SUFFIX)]
        tiff = next((side.with_name(stem + s) for s in TIFF_SUFFIXES if side.with_name(stem + s).is_file()), None)
        found.append(tiff or side.with_name(stem + TIFF_SUFFIXES[0]))
    return found


# ------------------------------------------------------------------------------------------- ownership


def writable_folder(path: Path) -> Path | None:
    """The nearest existing folder at or above ``path`` if a file can be created in it, else None.

    Tried for real (a probe file is made and removed): permission bits say nothing to root, to read-only
    mounts or to ``/proc``.
    """
    folder = next((a for a in [path, *path.parents] if a.exists() or a.is_symlink()), None)
    if folder is None or not folder.is_dir():
        return None
    try:
        fd, probe = tempfile.mkstemp(prefix=".lpfm-probe-", dir=folder)
    except OSError:
        return None
    os.close(fd)
    os.unlink(probe)
    return folder


def require_writable_folder(path: Path, what: str = "--out") -> None:
    """:class:`OutputExistsError` unless a file can be created at or above ``path`` (see :func:`writable_folder`)."""
    if writable_folder(path) is None:
        near = next((a for a in [path, *path.parents] if a.exists() or a.is_symlink()), path)
        if not near.is_dir():
            raise OutputExistsError(f"{what}: {near} is a file, not a folder", "choose another place")
        raise OutputExistsError(f"{what}: cannot write in {near}", "choose a folder you can write to")


def target_owner(path: Path) -> str:
    """``absent``, ``ours`` (an lpfm output: valid sidecar or embedded record) or ``foreign`` (anything else)."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    if path.is_symlink() or not path.is_file():
        return "foreign"
    try:
        side = sidecar_for(path)
        if side.exists():
            read_sidecar(side)
            return "ours"
        return "ours" if read_embedded(path) is not None else "foreign"
    except (ProvenanceError, CorruptImageError, OSError):
        return "foreign"


def check_target(path: Path, *, force: bool, key: str | None = None, uncertainty: bool = False) -> None:
    """Refuse to write ``path`` unless it is absent, or lpfm's own output (of ``key``, or any with ``force``).

    A file lpfm did not write is never replaced, not even with ``force``: moving it away is the user's call.
    The sidecar and uncertainty paths beside it are checked the same way.
    """
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputExistsError(f"{parent} is a file, not a folder", "choose another --out")
    require_writable_folder(parent)
    owner = target_owner(path)
    if owner == "foreign":
        what = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "a file lpfm did not write"
        raise OutputExistsError(
            f"{path} exists and is {what}; lpfm never replaces it, not even with --force",
            "choose another --out, or move that file away yourself",
        )
    side = sidecar_for(path)
    if side.exists() or side.is_symlink():
        try:
            if side.is_symlink():
                raise ProvenanceError(f"{side.name} is a symbolic link")
            read_sidecar(side)
        except (ProvenanceError, SlideNotFoundError) as exc:
            raise OutputExistsError(
                f"{side} exists and is not an lpfm sidecar ({exc.message})",
                "choose another --out, or move that file away yourself",
            ) from exc
    if uncertainty and target_owner(uncertainty_for(path)) == "foreign":
        raise OutputExistsError(
            f"{uncertainty_for(path)} exists and is not an lpfm output",
            "choose another --out, or move that file away yourself",
        )
    if owner == "ours" and not force:
        if not side.exists():
            raise OutputExistsError(
                f"{path} was made by lpfm but its {side.name} is missing",
                "add --force to make it again, or choose another --out",
            )
        if key is not None and read_sidecar(side).idempotency_key != key:
            raise OutputExistsError(
                f"{path} exists and was made by a different run", "choose another --out, or add --force to replace it"
            )


def check_writable_file(path: Path, what: str, marker: Callable[[Path], bool] | None = None) -> None:
    """Refuse a side file (e.g. ``--preview``) that cannot be written, or that exists and is not ours."""
    if path.is_dir():
        raise OutputExistsError(f"{what} {path} is a folder", "give a file name, e.g. preview.png")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or marker is None or not marker(path):
            raise OutputExistsError(
                f"{what} {path} exists and was not written by lpfm",
                "choose another name, or move that file away yourself",
            )
        if not os.access(path, os.W_OK):
            raise OutputExistsError(f"{what} {path} cannot be replaced (permission denied)", "choose another name")
    require_writable_folder(path.parent, f"{what} {path}")


# ------------------------------------------------------------------------------------------- checksums


def _open_tiff(path: Path) -> Any:
    from lpfm_toolkit.sources.local import TiffHandle

    return TiffHandle(path)


def _itemsize(dtype: Any) -> int:
    import numpy

    return int(numpy.dtype(dtype).itemsize)


def level_digests(path: Path, first: int = 0) -> list[str]:
    """The :class:`PixelDigest` of pyramid levels ``first``… of ``path`` as stored (decoded), band by band.

    Bands are decoded by a few threads (the codecs release the GIL), at most a handful ahead of the hash.
    """
    from concurrent.futures import ThreadPoolExecutor

    out = []
    workers = max(1, min(4, os.cpu_count() or 1))
    with _open_tiff(path) as handle, ThreadPoolExecutor(workers, thread_name_prefix="lpfm-verify") as pool:
        for level, lv in enumerate(handle.levels):
            if level < first:
                continue
            d = PixelDigest(lv.height, lv.width, len(handle.channel_names), handle.dtype)
            # pieces of _BAND_ROWS rows × at most _PIECE_BYTES of decoded pixels (whole 512-px tiles, whole digest
            # blocks), hashed in order; a few ahead, never more than _INFLIGHT_BYTES: memory does not grow with
            # the width of the image (a 32k-wide band of 512 rows would be 50 MB of RGB)
            row_bytes = _BAND_ROWS * len(handle.channel_names) * _itemsize(handle.dtype)
            step = max(_PIECE_ALIGN, (_PIECE_BYTES // row_bytes) // _PIECE_ALIGN * _PIECE_ALIGN)
            pieces = [(x, y) for y in range(0, lv.height, _BAND_ROWS) for x in range(0, lv.width, step)]
            read = lambda xy, lv=lv, level=level, step=step: handle.read_region(  # noqa: E731
                level, xy[0], xy[1], min(step, lv.width - xy[0]), min(_BAND_ROWS, lv.height - xy[1])
            )
            ahead = max(1, min(2 * workers, _INFLIGHT_BYTES // (step * row_bytes)))
            pending = [pool.submit(read, xy) for xy in pieces[:ahead]]
            for i, (x, _) in enumerate(pieces):
                piece = pending[i].result()
                if i + ahead < len(pieces):
                    pending.append(pool.submit(read, pieces[i + ahead]))
                pending[i] = None  # type: ignore[call-overload]  # free the piece once hashed
                d.update(x, piece)
            out.append(d.hexdigest())
    return out


def record_stored(tiff: Path, prov: Provenance, sidecar: Path) -> None:
    """Add the stored pixels' checksums and the file size to ``sidecar`` (rewritten atomically).

    Losslessly stored level 0 is the written pixels themselves: its checksum is ``output_sha256`` and it is not
    decoded again; lossy (JPEG) levels, and every reduced level, are decoded and hashed.
    """
    lossless = str(prov.output.get("compression", "")).lower() in LOSSLESS and prov.output_sha256 is not None
    levels = [prov.output_sha256, *level_digests(tiff, first=1)] if lossless else level_digests(tiff)
    stored: dict[str, Any] = {"scheme": DIGEST_SCHEME, "file_size": tiff.stat().st_size, "levels": levels}
    unc = prov.output.get("uncertainty")
    if unc and Path(unc).is_file():
        stored["uncertainty_file_size"] = Path(unc).stat().st_size
    prov.stored = stored
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(prov.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)


def check_output(tiff: Path, prov: Provenance | None = None, *, full: bool = False) -> list[str]:
    """Problems with an output (empty: intact). ``full`` decodes every level and compares its checksum."""
    import tifffile

    problems: list[str] = []
    try:
        rec = read_output(tiff)
    except (ProvenanceError, CorruptImageError, SlideNotFoundError) as exc:
        return [exc.message]
    if rec.sidecar is None:
        problems.append(f"its sidecar {sidecar_for(tiff).name} is missing")
    if rec.embedded is None:
        problems.append("its OME-XML carries no lpfm provenance")
    if rec.differences:
        problems.append("sidecar and embedded provenance disagree on " + ", ".join(rec.differences[:6]))
    prov = prov or rec.provenance
    if prov.idempotency_key != rec.provenance.idempotency_key:
        problems.append("it records another idempotency key")
    stored = prov.stored or {}
    size = tiff.stat().st_size
    if stored.get("file_size") is not None and stored["file_size"] != size:
        problems.append(f"its size is {size} bytes, {stored['file_size']} were written")
    try:
        with tifffile.TiffFile(tiff) as tif:
            series = tif.series[0]
            shapes = [lv.shape for lv in series.levels]
            pages = [page for lv in series.levels for page in lv.pages if page is not None]  # SubIFDs too
            for page in pages:  # tiles that would lie beyond the end: a truncated file
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
                if ends and max(ends) > size:
                    problems.append("its tiles reach beyond the end of the file (truncated)")
                    break
    except Exception as exc:  # noqa: BLE001 - a damaged TIFF can raise anything
        return [*problems, f"its TIFF structure is unreadable ({type(exc).__name__})"]
    want = prov.output.get("levels")
    if isinstance(want, list) and len(want) != len(shapes):
        problems.append(f"it has {len(shapes)} pyramid levels, {len(want)} were written")
    shape = prov.output.get("shape")
    if (
        isinstance(shape, list)
        and len(shape) == 3
        and shapes
        and tuple(shape[:2]) not in (tuple(shapes[0][:2]), tuple(shapes[0][-2:]))
    ):
        problems.append(f"its size is {shapes[0]}, {shape} was written")
    if prov.output.get("uncertainty") and not Path(str(prov.output["uncertainty"])).is_file():
        problems.append("its uncertainty map is missing")
    if problems or not full:
        return problems
    try:
        digests = level_digests(tiff)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on damaged data
        return [f"its pixels cannot be decoded ({getattr(exc, 'message', type(exc).__name__)})"]
    recorded = stored.get("levels") if stored.get("scheme") == DIGEST_SCHEME else None
    if isinstance(recorded, list):
        bad = [str(i) for i, (a, b) in enumerate(zip(digests, recorded)) if a != b]
        if bad or len(recorded) != len(digests):
            problems.append(
                f"pixels of level {', '.join(bad) or '?'} differ from the checksums recorded when it was written"
            )
    if (
        str(prov.output.get("compression", "")).lower() in LOSSLESS
        and prov.output_sha256
        and prov.tiling.get("checksums") == DIGEST_SCHEME
        and digests[0] != prov.output_sha256
    ):
        problems.append("full-resolution pixels differ from the recorded output sha256")
    if not isinstance(recorded, list) and str(prov.output.get("compression", "")).lower() not in LOSSLESS:
        problems.append(
            "no checksum of the stored pixels was recorded (made before lpfm verify existed), so "
            "these lossy-compressed pixels cannot be checked"
        )
    return problems


# ------------------------------------------------------------------------------------------- reproduce


class _DigestOnlyWriter(SinkWriter):
    """Takes stripes and keeps nothing: the pipeline computes the checksum of what passes through."""

    column_alignment = 1

    def write_block(self, x: int, rows: Any, uncertainty: Any = None) -> None:
        pass

    def write_rows(self, rows: Any, uncertainty: Any = None) -> None:
        pass

    def commit(self, provenance: Provenance) -> OutputRef:
        return OutputRef(uri="(not kept)", provenance=provenance)

    def abort(self) -> None:
        pass


class _DigestOnlySink(Sink):
    """A re-run's destination when only its checksum matters (memory stays one band, nothing is written)."""

    def find(self, idempotency_key: str, spec_name: str) -> OutputRef | None:
        return None

    def open(self, spec: OutputSpec, idempotency_key: str, source: dict[str, Any]) -> SinkWriter:
        return _DigestOnlyWriter()


@dataclass
class ReproduceReport:
    """What ``reproduce`` found: the output's own state, and a re-run compared with the record.

    ``output`` is the file, or the ``omero://`` URI of an OMERO result; ``file_problems`` are what is wrong with
    the stored pixels (a damaged file, pixels changed on the server), ``kind`` says which (``file``/``image``).
    """

    output: Path | str
    recorded_sha256: str | None
    reproduced_sha256: str | None
    file_problems: list[str]
    notes: list[str] = field(default_factory=list)
    kind: str = "file"

    @property
    def identical(self) -> bool:
        return not self.file_problems and self.recorded_sha256 == self.reproduced_sha256


def engine_for_record(desc: dict[str, Any], model: str | None = None, trust_pickle: bool = False) -> Any:
    """The engine a record names, with its sampler; a bundle is found by ``model``, its folder, or its name.

    :class:`ModelError` when the bundle found is not the one recorded (its checksum differs).
    """
    from lpfm_toolkit.options import EngineOptions

    options = EngineOptions.from_provenance(desc, trust_pickle=trust_pickle)
    if desc.get("name") != "lpfm":
        from lpfm_toolkit.engine import engine_from_description

        return engine_from_description(desc)
    from lpfm_toolkit.engine.bundle import load_bundle
    from lpfm_toolkit.engine.lpfm import LpfmEngine

    candidates = [c for c in (model, desc.get("model_path"), desc.get("model")) if c]
    chosen = next((c for c in candidates if Path(str(c)).expanduser().is_dir()), None) or (
        candidates[-1] if candidates else None
    )
    try:
        bundle = load_bundle(chosen, trust_pickle=trust_pickle)
    except ModelError as exc:
        raise ModelError(
            f"the bundle {desc.get('model')!r} this output was made with cannot be loaded ({exc.message})",
            "give its folder with --model PATH",
        ) from exc
    if desc.get("model_sha256") and bundle.sha256 != desc["model_sha256"]:
        raise ModelError(
            f"bundle {bundle.path} has checksum {bundle.sha256[:12]}…, the output was made with "
            f"{str(desc['model_sha256'])[:12]}…",
            "give the bundle it was made with: --model PATH",
        )
    steps = options.steps or 0
    return LpfmEngine(
        bundle, steps=steps, samples=options.samples, sampler=options.sampler if steps else None, tta=options.tta
    )


def source_path(uri: str) -> Path:
    """A local path from a recorded source URI (a plain path or a ``file:`` URI, as QuPath projects store them)."""
    if not uri.startswith("file:"):
        return Path(uri)
    from lpfm_toolkit.integrations.qupath.uris import as_local, path_from_uri  # QuPath's own URI rules (no paquo)

    pure = path_from_uri(uri)  # a Windows or UNC path recorded elsewhere cannot exist here: it is reported missing
    return as_local(pure) or Path(str(pure))


def is_omero_uri(output: str | Path) -> bool:
    """True for an OMERO result given as ``omero://host/image/ID`` (as its provenance records it)."""
    return isinstance(output, str) and output.startswith("omero://")


def rerun_digest(
    handle: Any,
    prov: Provenance,
    *,
    model: str | None = None,
    trust_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Re-run ``prov``'s region, task and seed of ``handle`` with its recorded engine and tiling; the pixels'
    checksum (nothing is kept: memory is one band). The engine is built here, after every other check."""
    from lpfm_toolkit.pipeline import WorkItem, run_item
    from lpfm_toolkit.prompts import Task
    from lpfm_toolkit.sources import Region

    src = prov.source
    if prov.engine.get("name") == "auto":  # lpfm enhance --auto: the recorded plan and each task's engine
        from lpfm_toolkit.qc import auto_engine_for_record

        engine = auto_engine_for_record(
            prov.engine, level=int(src["level"]), seed=int(prov.seed), model=model, trust_pickle=trust_pickle
        )
    else:
        engine = engine_for_record(prov.engine, model, trust_pickle)
    item = WorkItem(int(src["level"]), Region(*src["region"]), Task.from_dict(prov.task), int(prov.seed))
    result = run_item(
        handle,
        item,
        engine,
        _DigestOnlySink(),
        tile_size=prov.tiling.get("tile"),
        overlap=prov.tiling.get("overlap"),
        force=True,
        samples_uncertainty=int(prov.engine.get("samples", 1)) > 1,
        progress=progress,
    )
    digest = result.provenance.output_sha256
    assert digest is not None  # run_item always records the checksum of what it made
    return digest


def require_comparable(prov: Provenance, name: str) -> None:
    """:class:`ConfigError` when ``prov`` records its checksum in a form a re-run cannot be compared with."""
    if prov.tiling.get("checksums") != DIGEST_SCHEME:
        raise ConfigError(
            f"{name} records its checksum in an older form, which cannot be compared",
            "re-make it with `lpfm enhance ... --force`, then reproduce that",
        )


def reproduce(
    output: str | Path,
    *,
    model: str | None = None,
    trust_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
    session: Any = None,
) -> ReproduceReport:
    """Check ``output``'s stored pixels fully, re-run it from its record and compare the pixel checksums.

    ``output``: an OME-TIFF output (or its ``.lpfm.json``), also one added to a QuPath project, or an OMERO
    result as ``omero://host/image/ID``. For OMERO, ``session`` is an open
    :class:`~lpfm_toolkit.integrations.omero.session.OmeroSession`; without one, a session is opened from the
    environment (``OMERO_SESSION_KEY``, or ``OMERO_USER`` with ``OMERO_PASSWORD``) and the settings file.
    """
    if is_omero_uri(output):
        from lpfm_toolkit.integrations.omero.reproduce import reproduce_uri  # omero-py only when asked for

        return reproduce_uri(str(output), session=session, model=model, trust_pickle=trust_pickle, progress=progress)
    from lpfm_toolkit.sources import open_image
    from lpfm_toolkit.sources.local import file_fingerprint

    rec = read_output(output)
    if rec.differences:
        raise ProvenanceError(
            f"the sidecar and the provenance inside {rec.tiff.name} disagree on {', '.join(rec.differences[:6])}",
            "one was edited; `lpfm verify` says which file",
        )
    prov = rec.provenance
    require_comparable(prov, rec.tiff.name)
    src = prov.source
    if src.get("system") == "omero":
        raise SlideNotFoundError(
            f"{rec.tiff.name} was made from an OMERO image ({src.get('uri')}) into a file, which reproduce does not "
            "re-open",
            "results of `lpfm omero enhance` are reproduced on the server: `lpfm reproduce omero://HOST/image/ID`",
        )
    if src.get("system") not in ("file", "qupath"):
        raise SlideNotFoundError(
            f"the source of {rec.tiff.name} is on {src.get('system')}, which lpfm cannot re-open",
            "only file, QuPath and OMERO outputs can be reproduced",
        )
    # a QuPath entry's pixels are its image file's (the entry adds annotations and metadata, not pixels)
    path = source_path(str(src["uri"]))
    if not path.is_file():
        hint = " (the QuPath project's image moved? restore it there)" if src.get("system") == "qupath" else ""
        raise SlideNotFoundError(f"the source {path} is gone{hint}", "restore it to that path to reproduce")
    notes = []
    if file_fingerprint(path) != src.get("fingerprint"):
        notes.append(f"{path.name} has changed since the output was made")
    file_problems = check_output(rec.tiff, prov, full=True) if rec.tiff.is_file() else [f"{rec.tiff} is missing"]
    with open_image(path) as handle:
        digest = rerun_digest(handle, prov, model=model, trust_pickle=trust_pickle, progress=progress)
    return ReproduceReport(rec.tiff, prov.output_sha256, digest, file_problems, notes)
