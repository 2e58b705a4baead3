"""Pyramidal, tiled, compressed OME-TIFF output with provenance, written without holding the image.

Rows arrive top to bottom. Level 0 and every 2×-downsampled level are appended to raw scratch files
while rows stream in (memory: one row pair per level). On commit the TIFF is written tile by tile from
those files in the standard OME-TIFF layout — full resolution as the main IFD(s), reduced levels in
SubIFDs (Bio-Formats, QuPath and OMERO read it; tifffile and tiffslide see every level; OpenSlide 4
sees only the first) — with OME-XML carrying the provenance (MapAnnotation + the full JSON as a
CommentAnnotation), validated against the OME schema. Everything is written under temporary names
and renamed when complete, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lpfm_toolkit._version import __version__
from lpfm_toolkit.errors import ConfigError, OutputExistsError
from lpfm_toolkit.imageops import downsample2
from lpfm_toolkit.provenance import NAMESPACE, Provenance
from lpfm_toolkit.sinks.base import OutputRef, OutputSpec, Sink, SinkWriter

log = logging.getLogger(__name__)

COMPRESSIONS = ("auto", "jpeg", "zlib", "zstd", "lzw", "none")
SIDECAR_SUFFIX = ".lpfm.json"
JSON_NAMESPACE = NAMESPACE + "/json"
# Compression threads (tifffile compresses each buffered batch of tiles in parallel).
_COMMIT_WORKERS = max(1, min(8, os.cpu_count() or 1))
_BUFFER = 32 << 20  # bytes of tiles tifffile gathers per parallel pass: bounds memory (its default is 256 MB)
_OME_TYPES = {"uint8": "uint8", "uint16": "uint16", "float32": "float", "int16": "int16", "uint32": "uint32"}


def safe_filename(name: str) -> str:
    """A portable file name from a result name: ``CMU-1 [lpfm sr×2]`` → ``CMU-1_lpfm_srx2``."""
    name = name.replace("×", "x").replace("→", "-to-").replace("&", "and")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return name[:120] or "lpfm-output"


def sidecar_path(tiff_path: Path) -> Path:
    return tiff_path.with_name(tiff_path.name + SIDECAR_SUFFIX) if not tiff_path.name.endswith(".ome.tiff") \
        else tiff_path.with_name(tiff_path.name[: -len(".ome.tiff")] + SIDECAR_SUFFIX)


def n_pyramid_levels(width: int, height: int, tile: int) -> int:
    """Levels needed to reach one tile (each level halves both sides)."""
    return 1 + max(0, math.ceil(math.log2(max(width, height) / tile))) if max(width, height) > tile else 1


class _RawPyramid:
    """Scratch files holding a level-0 image and its 2× reductions, filled row by row."""

    def __init__(self, folder: Path, stem: str, width: int, height: int, channels: int, dtype: np.dtype,
                 n_levels: int, keep_level0: bool = True) -> None:
        self.dtype, self.channels = np.dtype(dtype), channels
        self.keep_level0 = keep_level0
        self.sizes: list[tuple[int, int]] = []
        w, h = width, height
        for _ in range(n_levels):
            self.sizes.append((w, h))
            w, h = (w + 1) // 2, (h + 1) // 2
        self.paths = [folder / f"{stem}-L{i}.raw" for i in range(n_levels)]
        self._files = [p.open("wb") for p in self.paths]
        self._rows_written = [0] * n_levels
        self._pending: list[np.ndarray | None] = [None] * n_levels

    def append(self, rows: np.ndarray, level: int = 0) -> None:
        if rows.shape[0] == 0:
            return
        w = self.sizes[level][0]
        if rows.shape[1:] != (w, self.channels):
            raise ValueError(f"rows of shape {rows.shape[1:]} do not fit level {level} ({w}, {self.channels})")
        if level or self.keep_level0:
            self._files[level].write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self._rows_written[level] += rows.shape[0]
        if level + 1 < len(self.sizes):
            pending = self._pending[level]
            buf = rows if pending is None else np.concatenate([pending, rows])
            even = buf.shape[0] - buf.shape[0] % 2
            self._pending[level] = buf[even:] if buf.shape[0] % 2 else None
            if even:
                self.append(downsample2(buf[:even]), level + 1)

    def finish(self) -> None:
        for level in range(len(self.sizes)):
            pending = self._pending[level]
            if pending is not None and pending.shape[0]:
                self._pending[level] = None
                self.append(downsample2(pending), level + 1)  # the odd last row is averaged with itself
        for level, f in enumerate(self._files):
            f.close()
            expected = self.sizes[level][1]
            if self._rows_written[level] != expected:
                raise RuntimeError(f"level {level} received {self._rows_written[level]} rows, expected {expected}")

    def tiles(self, level: int, tile: int, channel: int | None) -> Iterator[np.ndarray]:
        """Tiles of one level in row-major order, padded to ``tile`` at the edges."""
        w, h = self.sizes[level]
        row_bytes = w * self.channels * self.dtype.itemsize
        with self.paths[level].open("rb") as fh:
            for y in range(0, h, tile):
                n = min(tile, h - y)
                fh.seek(y * row_bytes)
                strip = np.frombuffer(fh.read(n * row_bytes), dtype=self.dtype).reshape(n, w, self.channels)
                if channel is not None:
                    strip = strip[:, :, channel : channel + 1]
                for x in range(0, w, tile):
                    block = strip[:, x : x + tile]
                    if block.shape[0] != tile or block.shape[1] != tile:
                        padded = np.zeros((tile, tile, block.shape[2]), self.dtype)
                        padded[: block.shape[0], : block.shape[1]] = block
                        block = padded
                    yield block if channel is None else block[:, :, 0]


def build_ome_xml(spec: OutputSpec, provenance: Provenance | None, channels: list[str], dtype: np.dtype,
                  interleaved_rgb: bool) -> str:
    """OME-XML for one image, with the provenance as a MapAnnotation and a JSON CommentAnnotation."""
    from ome_types import model as m

    annotations = None
    refs: list[Any] = []
    if provenance is not None:
        pairs = [m.Map.M(k=k, value=v) for k, v in provenance.summary().items()]
        annotations = m.StructuredAnnotations(
            map_annotations=[m.MapAnnotation(id="Annotation:0", namespace=NAMESPACE, value=m.Map(ms=pairs))],
            comment_annotations=[m.CommentAnnotation(id="Annotation:1", namespace=JSON_NAMESPACE,
                                                     value=provenance.to_json(indent=None))],
        )
        refs = [m.AnnotationRef(id="Annotation:0"), m.AnnotationRef(id="Annotation:1")]
    if interleaved_rgb:
        chans = [m.Channel(id="Channel:0:0", name="RGB", samples_per_pixel=3)]
        tiffdata = [m.TiffData(ifd=0, plane_count=1)]
    else:
        chans = [m.Channel(id=f"Channel:0:{i}", name=name, samples_per_pixel=1) for i, name in enumerate(channels)]
        tiffdata = [m.TiffData(ifd=i, first_c=i, plane_count=1) for i in range(len(channels))]
    kwargs: dict[str, Any] = {}
    if spec.mpp:
        kwargs = {"physical_size_x": spec.mpp[0], "physical_size_x_unit": "µm",
                  "physical_size_y": spec.mpp[1], "physical_size_y_unit": "µm"}
    pixels = m.Pixels(id="Pixels:0", dimension_order="XYCZT", type=_OME_TYPES[np.dtype(dtype).name],
                      size_x=spec.width, size_y=spec.height, size_c=len(channels), size_z=1, size_t=1,
                      interleaved=interleaved_rgb, big_endian=False, channels=chans, tiff_data_blocks=tiffdata,
                      **kwargs)
    image = m.Image(id="Image:0", name=spec.name, pixels=pixels, annotation_refs=refs)
    ome = m.OME(images=[image], structured_annotations=annotations, creator=f"lpfm-toolkit {__version__}")
    # TIFF strings are 7-bit ASCII: non-ASCII (µm, ×) becomes XML character references, still valid OME-XML.
    return ome.to_xml().encode("ascii", "xmlcharrefreplace").decode("ascii")


def validate_ome_xml(xml: str) -> None:
    """Raise ``ValueError`` unless ``xml`` validates against the OME schema."""
    from ome_types import from_xml

    from_xml(xml, validate=True)


def _tiff_options(raw: _RawPyramid, spec: OutputSpec, tile: int, compression: str,
                  channel_names: list[str]) -> tuple[bool, dict[str, Any], tuple[float, float] | None]:
    rgb = channel_names == ["R", "G", "B"] and raw.dtype == np.uint8
    comp: Any = None if compression == "none" else compression
    comp_args = {"level": 90} if compression == "jpeg" else None
    resolution = (1e4 / spec.mpp[0], 1e4 / spec.mpp[1]) if spec.mpp else None
    common = {"tile": (tile, tile), "compression": comp, "compressionargs": comp_args, "dtype": raw.dtype,
              "metadata": None, "software": f"lpfm-toolkit {__version__}",
              "photometric": "rgb" if rgb else "minisblack"}
    return rgb, common, resolution


def _write_levels(tw: Any, raw: _RawPyramid, rgb: bool, common: dict[str, Any],
                  resolution: tuple[float, float] | None, channel: int | None) -> None:
    """Write the reduced levels (SubIFDs) of one page from the scratch files."""
    for level in range(1, len(raw.sizes)):
        lw, lh = raw.sizes[level]
        lres = (resolution[0] / 2**level, resolution[1] / 2**level) if resolution else None
        tw.write(raw.tiles(level, common["tile"][0], channel), shape=(lh, lw, 3) if rgb else (lh, lw),
                 subfiletype=1, resolution=lres, resolutionunit="CENTIMETER" if lres else None,
                 maxworkers=_COMMIT_WORKERS, buffersize=_BUFFER, **common)


def _write_tiff(path: Path, raw: _RawPyramid, spec: OutputSpec, xml: str, tile: int, compression: str,
                channel_names: list[str]) -> None:
    """Write a whole OME-TIFF from scratch files: one page per plane, each followed by its SubIFDs."""
    import tifffile

    rgb, common, resolution = _tiff_options(raw, spec, tile, compression, channel_names)
    planes = [None] if rgb else list(range(raw.channels))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, ch in enumerate(planes):
            w, h = raw.sizes[0]
            tw.write(raw.tiles(0, tile, ch), shape=(h, w, 3) if rgb else (h, w), subifds=len(raw.sizes) - 1,
                     description=xml if i == 0 else None, resolution=resolution,
                     resolutionunit="CENTIMETER" if resolution else None, maxworkers=_COMMIT_WORKERS,
                     buffersize=_BUFFER, **common)
            _write_levels(tw, raw, rgb, common, resolution, ch)


class _StreamedTiff:
    """Writes the full-resolution level of a one-page image while rows arrive, on its own thread.

    Tiles are compressed as soon as a tile row is complete, overlapping the engine's work; the reduced
    levels follow from the scratch files at commit, and the OME-XML (which needs the final checksums)
    replaces the provisional description then.
    """

    def __init__(self, path: Path, raw: _RawPyramid, spec: OutputSpec, tile: int, compression: str,
                 provisional_xml: str) -> None:
        import queue
        import threading

        self.path, self.raw, self.tile = path, raw, tile
        self.rgb, self.common, self.resolution = _tiff_options(raw, spec, tile, compression, spec.channel_names)
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=8)  # bounded: a few tiles in flight
        self._levels_ready = threading.Event()
        self._abort = False
        self._error: BaseException | None = None
        self._strip = np.zeros((0, spec.width, raw.channels), raw.dtype)
        self._thread = threading.Thread(target=self._run, args=(spec, provisional_xml), name="lpfm-tiff",
                                        daemon=True)
        self._thread.start()

    def _tiles(self) -> Iterator[np.ndarray]:
        while True:
            block = self._queue.get()
            if block is None:
                return
            yield block if self.rgb else block[:, :, 0]

    def _run(self, spec: OutputSpec, xml: str) -> None:
        import tifffile

        try:
            with tifffile.TiffWriter(self.path, bigtiff=True) as tw:
                shape = (spec.height, spec.width, 3) if self.rgb else (spec.height, spec.width)
                tw.write(self._tiles(), shape=shape, subifds=len(self.raw.sizes) - 1, description=xml,
                         resolution=self.resolution, resolutionunit="CENTIMETER" if self.resolution else None,
                         maxworkers=_COMMIT_WORKERS, buffersize=_BUFFER, **self.common)
                self._levels_ready.wait()
                if not self._abort:
                    _write_levels(tw, self.raw, self.rgb, self.common, self.resolution, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in finish()
            self._error = exc
            while not self._abort:  # keep draining so the producer never blocks
                if self._queue.get() is None:
                    break

    def _emit(self, strip: np.ndarray) -> None:
        t = self.tile
        for x in range(0, strip.shape[1], t):
            block = strip[:, x : x + t]
            if block.shape[:2] != (t, t):
                padded = np.zeros((t, t, block.shape[2]), block.dtype)
                padded[: block.shape[0], : block.shape[1]] = block
                block = padded
            self._queue.put(np.ascontiguousarray(block))

    def add_rows(self, rows: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._strip = np.concatenate([self._strip, rows]) if self._strip.shape[0] else rows
        while self._strip.shape[0] >= self.tile:
            self._emit(self._strip[: self.tile])
            self._strip = self._strip[self.tile :]

    def start_levels(self) -> None:
        """Flush the last tile row and let the thread write the reduced levels (scratch files are complete)."""
        if self._strip.shape[0]:
            self._emit(self._strip)
            self._strip = self._strip[:0]
        self._queue.put(None)
        self._levels_ready.set()

    def finish(self, xml: str) -> None:
        """Wait for the levels, then put the final OME-XML in place."""
        import tifffile

        self._thread.join()
        if self._error is not None:
            raise self._error
        tifffile.tiffcomment(self.path, xml)

    def abort(self) -> None:
        import queue

        self._abort = True
        self._levels_ready.set()
        while True:  # empty the queue so the end marker fits and the thread stops at once
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout=30)


class OmeTiffWriter(SinkWriter):
    """Streams one result into scratch files; ``commit`` writes the OME-TIFF and sidecar atomically."""

    def __init__(self, final: Path, spec: OutputSpec, tile: int, compression: str) -> None:
        self.final, self.spec, self.tile = final, spec, tile
        if compression == "auto":
            compression = "jpeg" if spec.is_rgb else "zlib"
        if compression == "jpeg" and np.dtype(spec.dtype) != np.uint8:
            raise ConfigError(f"JPEG cannot store {np.dtype(spec.dtype).name} pixels",
                              "use --compression zlib (lossless) for 16-bit or float images")
        self.compression = compression
        final.parent.mkdir(parents=True, exist_ok=True)
        self._scratch = Path(tempfile.mkdtemp(prefix=".lpfm-scratch-", dir=final.parent))
        n_levels = n_pyramid_levels(spec.width, spec.height, tile)
        # One-page images (RGB, or one channel) stream their full resolution straight into the TIFF;
        # multi-channel images are planar (one page per channel) and are written from scratch files.
        one_page = spec.is_rgb or len(spec.channel_names) == 1
        self._raw = _RawPyramid(self._scratch, "img", spec.width, spec.height, len(spec.channel_names),
                                np.dtype(spec.dtype), n_levels, keep_level0=not one_page)
        self._tmp_tiff = self._scratch / "out.ome.tiff"
        # The description is a placeholder until commit, when the OME-XML with the provenance replaces it
        # (the file is only renamed into place after that, so no reader ever sees the placeholder).
        self._stream = _StreamedTiff(self._tmp_tiff, self._raw, spec, tile, self.compression,
                                     "lpfm-toolkit: incomplete") if one_page else None
        self._unc = _RawPyramid(self._scratch, "unc", spec.width, spec.height, 1, np.dtype(np.float32), n_levels) \
            if spec.uncertainty else None
        self._done = False

    def write_rows(self, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        if self._stream is not None:
            self._stream.add_rows(rows)
        self._raw.append(rows)
        if self._unc is not None:
            if uncertainty is None:
                raise ValueError("this output expects an uncertainty map with every row")
            self._unc.append(uncertainty.astype(np.float32))

    @property
    def uncertainty_path(self) -> Path:
        return self.final.with_name(self.final.name.replace(".ome.tiff", ".uncertainty.ome.tiff"))

    def commit(self, provenance: Provenance) -> OutputRef:
        self._raw.finish()
        extra: dict[str, Any] = {"sidecar": str(sidecar_path(self.final)), "levels": [list(s) for s in self._raw.sizes],
                                 "compression": self.compression, "tile": self.tile}
        if self._unc is not None:
            extra["uncertainty"] = str(self.uncertainty_path)
        provenance.output.update({"uri": str(self.final.resolve()), "format": "ome-tiff", **extra})
        if self._stream is not None:
            self._stream.start_levels()  # the levels are written while the OME-XML is built and validated
        xml = build_ome_xml(self.spec, provenance, self.spec.channel_names, self._raw.dtype, self.spec.is_rgb)
        validate_ome_xml(xml)
        tmp_tiff = self._tmp_tiff
        if self._stream is not None:
            self._stream.finish(xml)
        else:
            _write_tiff(tmp_tiff, self._raw, self.spec, xml, self.tile, self.compression, self.spec.channel_names)
        tmp_unc = None
        if self._unc is not None:
            self._unc.finish()
            unc_spec = OutputSpec(self.spec.name + " uncertainty", self.spec.width, self.spec.height,
                                  ["uncertainty"], np.dtype(np.float32), self.spec.mpp)
            unc_xml = build_ome_xml(unc_spec, provenance, ["uncertainty"], np.dtype(np.float32), False)
            tmp_unc = self._scratch / "unc.ome.tiff"
            _write_tiff(tmp_unc, self._unc, unc_spec, unc_xml, self.tile, "zlib", ["uncertainty"])
        tmp_json = self._scratch / "out.json"
        tmp_json.write_text(provenance.to_json(), encoding="utf-8")
        # The sidecar lands last: its presence is what marks the result complete for find().
        if tmp_unc is not None:
            os.replace(tmp_unc, self.uncertainty_path)
        os.replace(tmp_tiff, self.final)
        os.replace(tmp_json, sidecar_path(self.final))
        self._done = True
        shutil.rmtree(self._scratch, ignore_errors=True)
        log.info("wrote %s", self.final)
        return OutputRef(uri=str(self.final), provenance=provenance, extra=extra)

    def abort(self) -> None:
        if not self._done:
            if self._stream is not None:
                self._stream.abort()
            for f in (*self._raw._files, *(self._unc._files if self._unc else ())):
                f.close()
            shutil.rmtree(self._scratch, ignore_errors=True)


class OmeTiffSink(Sink):
    """Writes each result as ``<directory>/<name>.<key>.ome.tiff`` (or to one given ``path``) + a JSON sidecar."""

    def __init__(self, directory: str | Path | None = None, *, path: str | Path | None = None,
                 compression: str = "auto", tile: int = 512, overwrite: bool = False) -> None:
        if (directory is None) == (path is None):
            raise ValueError("give exactly one of directory or path")
        if compression not in COMPRESSIONS:
            raise ConfigError(f"compression {compression!r} is not supported", f"use one of {', '.join(COMPRESSIONS)}")
        if tile % 16 or tile < 16:
            raise ConfigError(f"TIFF tile size {tile} is not a multiple of 16", "use 256 or 512")
        self.directory = Path(directory) if directory is not None else None
        self.path = Path(path) if path is not None else None
        self.compression, self.tile, self.overwrite = compression, tile, overwrite

    def target(self, key: str, name: str) -> Path:
        if self.path is not None:
            p = self.path
            return p if p.name.endswith((".ome.tiff", ".ome.tif")) else p.with_name(p.name + ".ome.tiff")
        assert self.directory is not None
        return self.directory / f"{safe_filename(name)}.{key[:10]}.ome.tiff"

    def find(self, idempotency_key: str, spec_name: str) -> OutputRef | None:
        final = self.target(idempotency_key, spec_name)
        side = sidecar_path(final)
        if not (final.exists() and side.exists()):
            return None
        try:
            prov = Provenance.from_json(side.read_text(encoding="utf-8"))
        except (ValueError, TypeError, json.JSONDecodeError):
            return None
        if prov.idempotency_key == idempotency_key:
            return OutputRef(uri=str(final), provenance=prov, extra={"sidecar": str(side)})
        if self.path is not None and not self.overwrite:
            raise OutputExistsError(f"{final} exists and was made by a different run",
                                    "choose another --out, or add --force to replace it")
        return None

    def open(self, spec: OutputSpec, idempotency_key: str, source: dict[str, Any]) -> OmeTiffWriter:
        final = self.target(idempotency_key, spec.name)
        if source.get("system") == "file" and Path(str(source.get("uri", ""))).resolve() == final.resolve():
            raise OutputExistsError(f"refusing to write over the original {final}", "choose another --out")
        return OmeTiffWriter(final, spec, self.tile, self.compression)


def read_provenance(path: str | Path) -> Provenance:
    """Provenance of an output: from its sidecar, else from the OME-XML inside the TIFF (or a JSON file)."""
    from lpfm_toolkit.errors import CorruptImageError, SlideNotFoundError

    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(f"{p} does not exist", "give an lpfm output (.ome.tiff) or its .lpfm.json sidecar")
    if p.suffix == ".json":
        return Provenance.from_json(p.read_text(encoding="utf-8"))
    side = sidecar_path(p)
    if side.exists():
        return Provenance.from_json(side.read_text(encoding="utf-8"))
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            xml = tif.ome_metadata or ""
    except tifffile.TiffFileError as exc:
        raise CorruptImageError(f"{p.name} is not a readable TIFF: {exc}") from exc
    from ome_types import from_xml

    ome = from_xml(xml) if xml else None
    if ome is not None and ome.structured_annotations is not None:
        for ann in ome.structured_annotations.comment_annotations:
            if ann.namespace == JSON_NAMESPACE:
                return Provenance.from_json(ann.value)
    raise CorruptImageError(f"{p.name} carries no lpfm provenance", "only outputs written by lpfm have one")
