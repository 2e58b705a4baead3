"""The provenance record that travels with every output.

One :class:`Provenance` is serialised to JSON (sidecar), into OME-XML (a MapAnnotation), as OMERO
key-value pairs and as QuPath entry metadata. :func:`idempotency_key` hashes what determines the
pixels, so re-running the same plan is recognised and skipped.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import platform
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from lpfm_toolkit._version import __version__

SCHEMA = "lpfm-toolkit/provenance/v1"
NAMESPACE = "lpfm-toolkit/provenance"

# Keys whose values must never be written anywhere (defence in depth: nothing should put them here).
_SECRET_WORDS = ("password", "passwd", "secret", "session_key", "sessionkey", "token")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def idempotency_key(
    source: dict[str, Any], region: dict[str, Any], task: dict[str, Any], engine: dict[str, Any], seed: int
) -> str:
    """sha256 over what determines the output: source identity, region, task, model + sampler, seed.

    The raw prompt text is left out: "sr x2" and "super-resolve by 2" are the same work.
    """
    task = {k: v for k, v in task.items() if k != "prompt"}
    payload = {"source": source, "region": region, "task": task, "engine": engine, "seed": seed}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def package_versions(
    names: tuple[str, ...] = (
        "numpy",
        "tifffile",
        "scikit-image",
        "torch",
        "diffusers",
        "openslide-python",
        "omero-py",
        "paquo",
    ),
) -> dict[str, str]:
    """Installed versions of the packages that can influence pixels (absent ones are omitted)."""
    out = {"lpfm-toolkit": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return dict(out)


def _annotation_label(ann: Any) -> str:
    """``Class: name (id)`` for metadata tables; the full record (with geometry) stays in the JSON."""
    if not ann:
        return ""
    if not isinstance(ann, dict):
        return str(ann)
    label = ann.get("name") or ""
    if ann.get("id"):
        label = f"{label} ({ann['id']})".strip()
    return f"{ann['class']}: {label}" if ann.get("class") else label


def scrub(obj: Any) -> Any:
    """Drop any key that names a secret, recursively."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if not any(w in str(k).lower() for w in _SECRET_WORDS)}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


@dataclass
class Provenance:
    """Everything needed to trace and reproduce one output."""

    source: dict[str, Any]  # system, uri, name, fingerprint, level, region [x,y,w,h], annotation, mpp
    prompt: str
    task: dict[str, Any]
    engine: dict[str, Any]  # name, model, model_sha256, method, sampler, steps, samples, device, dtype
    seed: int
    idempotency_key: str
    tiling: dict[str, Any] = field(default_factory=dict)  # tile, overlap, scale
    output: dict[str, Any] = field(default_factory=dict)  # uri, shape, dtype, mpp, levels, channels
    input_sha256: str | None = None
    output_sha256: str | None = None
    durations: dict[str, float] = field(default_factory=dict)
    #: checksums of the pixels as stored and decoded, one per pyramid level, and the file size; added to the
    #: sidecar after the file is complete (the embedded copy cannot hold the digest of the file it is in)
    stored: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=lambda: dict(package_versions()))
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return scrub(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> Provenance:
        return cls.from_dict(json.loads(text))

    @classmethod
    def parse(cls, text: str | bytes, where: str) -> Provenance:
        """A record from untrusted JSON text, checked field by field; :class:`ProvenanceError` names the problem.

        ``where`` names the record in messages (e.g. the sidecar's file name).
        """
        from lpfm_toolkit.errors import ProvenanceError

        fix = "it was damaged or edited; remake the output with `lpfm enhance ... --force`"
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProvenanceError(f"{where} is not text (binary data)", fix) from exc
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise ProvenanceError(f"{where} is not valid JSON ({msg})", fix) from exc
        problem = record_problem(data)
        if problem:
            raise ProvenanceError(f"{where}: {problem}", fix)
        return cls.from_dict(data)

    def summary(self) -> dict[str, str]:
        """Flat string key-value pairs for OMERO MapAnnotations, OME MapAnnotations and QuPath metadata."""
        region = self.source.get("region")
        pairs = {
            "lpfm.schema": self.schema,
            "lpfm.version": self.versions.get("lpfm-toolkit", ""),
            "lpfm.created": self.created,
            "lpfm.source.system": str(self.source.get("system", "")),
            "lpfm.source.uri": str(self.source.get("uri", "")),
            "lpfm.source.id": str(self.source.get("id", "")),
            "lpfm.source.level": str(self.source.get("level", "")),
            "lpfm.source.region": ",".join(str(v) for v in region) if region else "",
            "lpfm.source.annotation": _annotation_label(self.source.get("annotation")),
            "lpfm.prompt": self.prompt,
            "lpfm.task": self.task.get("kind", ""),
            "lpfm.task.scale": str(self.task.get("scale", 1)),
            "lpfm.engine": str(self.engine.get("name", "")),
            "lpfm.model": str(self.engine.get("model") or ""),
            "lpfm.model.sha256": str(self.engine.get("model_sha256") or ""),
            "lpfm.sampler": str(self.engine.get("sampler") or self.engine.get("method") or ""),
            "lpfm.steps": str(self.engine.get("steps", "")),
            "lpfm.device": str(self.engine.get("device", "")),
            "lpfm.seed": str(self.seed),
            "lpfm.input.sha256": self.input_sha256 or "",
            "lpfm.output.sha256": self.output_sha256 or "",
            "lpfm.output.compression": str(self.output.get("compression") or ""),
            "lpfm.output.jpeg_quality": str(self.output.get("jpeg_quality") or ""),
            "lpfm.output.jpeg_subsampling": str(self.output.get("jpeg_subsampling") or ""),
            "lpfm.idempotency_key": self.idempotency_key,
        }
        return {k: v for k, v in pairs.items() if v != ""}


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def record_problem(data: Any) -> str | None:
    """What makes ``data`` not a usable provenance record (wrong types, missing or impossible values), or None."""
    from lpfm_toolkit.errors import LpfmError
    from lpfm_toolkit.prompts import Task

    if not isinstance(data, dict):
        return f"is not a provenance record (a JSON {type(data).__name__}, not an object)"
    if not str(data.get("schema", "")).startswith("lpfm-toolkit/provenance/"):
        return "is not an lpfm provenance record (no lpfm-toolkit schema)"
    for name in ("source", "task", "engine"):
        if not isinstance(data.get(name), dict):
            return f"{name!r} is missing or not an object"
    for name in ("tiling", "output", "durations", "versions", "stored"):
        if name in data and not isinstance(data[name], dict):
            return f"{name!r} is not an object"
    if not isinstance(data.get("prompt"), str):
        return "'prompt' is missing or not text"
    if not _is_int(data.get("seed")) or data["seed"] < 0:
        return "'seed' is missing or not a non-negative integer"
    if not isinstance(data.get("idempotency_key"), str) or not _HEX64.fullmatch(data["idempotency_key"]):
        return "'idempotency_key' is missing or not a sha256"
    for name in ("input_sha256", "output_sha256"):
        if data.get(name) is not None and not (isinstance(data[name], str) and _HEX64.fullmatch(data[name])):
            return f"{name!r} is not a sha256"
    src = data["source"]
    if not isinstance(src.get("system"), str) or not isinstance(src.get("uri"), str):
        return "source 'system'/'uri' missing or not text"
    if not _is_int(src.get("level")) or src["level"] < 0:
        return f"source level {str(src.get('level'))[:20]!r} is not a non-negative integer"
    region = src.get("region")
    if not (isinstance(region, list) and len(region) == 4 and all(_is_int(v) for v in region)):
        return f"source region {str(region)[:40]!r} is not four integers"
    if region[0] < 0 or region[1] < 0 or region[2] <= 0 or region[3] <= 0:
        return f"source region {region} has a negative origin or an empty size"
    try:
        Task.from_dict(data["task"])
    except (LpfmError, KeyError, ValueError, TypeError, AttributeError) as exc:
        return f"task is not a known task ({str(exc)[:80]})"
    engine = data["engine"]
    if not isinstance(engine.get("name"), str):
        return "engine 'name' is missing"
    for name, low in (("steps", 0), ("samples", 1)):
        if name in engine and (not _is_int(engine[name]) or engine[name] < low):
            return f"engine {name} {str(engine[name])[:20]!r} is not an integer ≥ {low}"
    for name in ("model", "model_path", "model_sha256", "sampler", "method"):
        if engine.get(name) is not None and not isinstance(engine[name], str):
            return f"engine {name} is not text"
    tiling = data.get("tiling", {})
    for name, low in (("tile", 1), ("overlap", 0), ("scale", 1)):
        if name in tiling and (not _is_int(tiling[name]) or tiling[name] < low):
            return f"tiling {name} {str(tiling[name])[:20]!r} is not an integer ≥ {low}"
    return None


#: Width of the column blocks a :class:`PixelDigest` hashes separately (pixels).
DIGEST_BLOCK = 64
DIGEST_SCHEME = f"sha256 of {DIGEST_BLOCK}-px column blocks (lpfm_toolkit.provenance.pixel_digest)"


class PixelDigest:
    """The checksum of an image that arrives in vertical stripes, whatever their width.

    The image is cut into column blocks ``DIGEST_BLOCK`` pixels wide; each block is hashed (sha256) top
    to bottom in C order, and the result is the sha256 of the shape, the dtype and the blocks' digests
    in order. Stripes must start on a block boundary; within a stripe, rows arrive top to bottom.
    """

    def __init__(self, height: int, width: int, channels: int, dtype: Any) -> None:
        import numpy as np

        self.shape = (height, width, channels)
        self.dtype = np.dtype(dtype)
        self._blocks = [hashlib.sha256() for _ in range(-(-width // DIGEST_BLOCK))]
        self._rows = [0] * len(self._blocks)

    def update(self, x: int, rows: Any) -> None:
        """Add ``rows`` ``(n, w, C)`` that start at column ``x`` (a multiple of ``DIGEST_BLOCK``)."""
        import numpy as np

        if x % DIGEST_BLOCK:
            raise ValueError(f"column {x} is not on a {DIGEST_BLOCK}-px block boundary")
        w = rows.shape[1]
        if (x + w) % DIGEST_BLOCK and x + w != self.shape[1]:
            raise ValueError(f"columns {x}..{x + w} end inside a block")
        for b in range(x // DIGEST_BLOCK, -(-(x + w) // DIGEST_BLOCK)):
            a = b * DIGEST_BLOCK - x
            part = rows[:, a : a + DIGEST_BLOCK]
            self._blocks[b].update(np.ascontiguousarray(part, self.dtype).data)
            self._rows[b] += part.shape[0]

    def hexdigest(self) -> str:
        if any(n != self.shape[0] for n in self._rows):
            raise ValueError("not every row of every column block was added")
        head = f"{self.shape[0]}x{self.shape[1]}x{self.shape[2]}:{self.dtype.str}".encode()
        return hashlib.sha256(head + b"".join(b.digest() for b in self._blocks)).hexdigest()


def pixel_digest(pixels: Any) -> str:
    """The :class:`PixelDigest` of a whole ``(H, W, C)`` array (what provenance records as a sha256)."""
    d = PixelDigest(*pixels.shape, dtype=pixels.dtype)
    d.update(0, pixels)
    return d.hexdigest()
