"""Settings resolved once, in layers: defaults → user file → ``LPFM_*`` environment → command-line flags.

``load_settings()`` returns a :class:`Settings` that remembers where each value came from, so
``lpfm config show`` can print the effective values and their origin. Passwords never live here:
OMERO credentials other than the password may be configured; the password comes from the
environment or a prompt in the CLI only.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lpfm_toolkit.errors import ConfigError
from lpfm_toolkit.options import EngineOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (the OMERO suite's interpreter)
    import tomli as tomllib

ENV_PREFIX = "LPFM_"
FORBIDDEN = ("password", "session_key", "secret", "token")

#: name → (lowest, highest, why): integer settings outside these bounds are refused where they are read, so a
#: typo such as ``--tile 0`` or ``--samples 0`` fails before any work instead of being taken as the default
LIMITS: dict[str, tuple[int, int, str]] = {
    "tile_size": (16, 4096, "use a tile of 16–4096 input pixels (default 256)"),
    "overlap": (0, 2048, "use an overlap of 0 or more pixels, smaller than the tile (default 32)"),
    "jobs_workers": (1, 1024, "use 1 or more workers"),
    "jobs_max_attempts": (1, 100, "use 1 or more attempts"),
    "seed": (0, 2**63 - 1, "use a seed from 0 to 2**63-1"),
    "omero_port": (1, 65535, "use a TCP port from 1 to 65535"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "compression": ("auto", "jpeg", "zlib", "zstd", "lzw", "none"),
    "tiff_tile": ("256", "512"),
}


def config_path() -> Path:
    """``$LPFM_CONFIG``, else ``$XDG_CONFIG_HOME/lpfm/config.toml`` (``~/.config/lpfm/config.toml``)."""
    if os.environ.get("LPFM_CONFIG"):
        return Path(os.environ["LPFM_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "lpfm" / "config.toml"


@dataclass(frozen=True)
class Key:
    """Where a setting lives in the file: ``[section] name``; its flag is ``--name`` with dashes.

    ``field``: the :class:`Settings` attribute; ``old``: flat keys (and ``LPFM_*`` names) of earlier
    versions, still read.
    """

    section: str
    name: str
    field: str
    old: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        """``LPFM_<NAME>``; OMERO and jobs settings carry their section: ``LPFM_OMERO_HOST``, ``LPFM_JOBS_STORE``."""
        prefix = f"{self.section}_" if self.section in ("omero", "jobs") else ""
        return f"{ENV_PREFIX}{prefix}{self.name}".upper()


#: every setting by section, in the order ``lpfm config show`` prints them; keys are the flags' names
KEYS: tuple[Key, ...] = (
    *(Key("engine", n, n) for n in ("engine", "method", "model", "device", "steps", "samples", "sampler")),
    *(Key("engine", n, n) for n in ("tta", "threads", "compile", "seed")),
    Key("tiling", "tile", "tile_size", old=("tile_size",)),
    Key("tiling", "overlap", "overlap"),
    Key("output", "out", "output_dir", old=("output_dir",)),
    Key("output", "compression", "compression"),
    Key("output", "tiff_tile", "tiff_tile"),
    *(Key("omero", n, f"omero_{n}", old=(f"omero_{n}",)) for n in ("host", "port", "user", "group", "secure")),
    Key("jobs", "store", "jobs_store"),
    Key("jobs", "workers", "jobs_workers"),
    Key("jobs", "max_attempts", "jobs_max_attempts"),
    Key("jobs", "lease", "jobs_lease"),
)
SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS))
#: every name a setting is known by in a flat (section-less) file or an ``LPFM_*`` variable → its key
_FLAT: dict[str, Key] = {
    **{k.field: k for k in KEYS},
    **{k.name: k for k in KEYS if k.section not in ("omero", "jobs")},
    **{o: k for k in KEYS for o in k.old},
}


@dataclass
class Settings:
    """Effective settings; ``origin[field]`` is ``default``, the file path, ``env:NAME`` or ``flag``.

    In the file they are grouped in sections (``[engine] [tiling] [output] [omero] [jobs]``, see :data:`KEYS`);
    flat keys of earlier versions (``tile_size = 128``, ``omero_host = …``) are read as before.
    """

    engine: str = "auto"
    method: str | None = None
    model: str | None = None
    device: str | None = None
    steps: int | None = None
    samples: int = 1
    sampler: str | None = None
    tta: bool = False
    threads: int | None = None
    compile: bool = False
    seed: int = 0
    tile_size: int | None = None
    overlap: int | None = None
    compression: str = "auto"
    tiff_tile: int = 512
    output_dir: str = "lpfm-out"
    omero_host: str | None = None
    omero_port: int = 4064
    omero_user: str | None = None
    omero_group: str | None = None
    omero_secure: bool = True
    jobs_store: str = "lpfm-jobs.sqlite"
    jobs_workers: int = 1
    jobs_max_attempts: int = 3
    jobs_lease: float = 600.0
    origin: dict[str, str] = field(default_factory=dict, repr=False)

    def apply(self, values: dict[str, Any], origin: str, section: str | None = None) -> None:
        """Override fields from ``values`` (None values are ignored), converting types.

        ``values``: ``{section: {key: value}}`` as in the file, flat keys (current or old names), or both;
        ``section``: ``values`` are the keys of that section.
        """
        known = {f.name: f for f in fields(self) if f.name != "origin"}
        keys = _FLAT if section is None else {k.name: k for k in KEYS if k.section == section}
        where = "" if section is None else f" in [{section}]"
        for raw_key, raw in values.items():
            key = raw_key.replace("-", "_").lower()
            if any(word in key for word in FORBIDDEN):
                raise ConfigError(
                    f"{origin} sets {key!r}{where}: secrets are not read from configuration",
                    "give passwords through OMERO_PASSWORD or the prompt, never a file",
                )
            if section is None and key in SECTIONS and isinstance(raw, dict):
                self.apply(raw, origin, key)
            elif key not in keys:
                hint = f"known: {_known()}" if section is None else f"known there: {', '.join(keys)}"
                raise ConfigError(f"{origin}: unknown setting {key!r}{where}", hint)
            else:
                self._set(known[keys[key].field], raw, origin)

    def _set(self, f: dataclasses.Field, raw: Any, origin: str) -> None:
        if raw is None:
            return
        if f.name in EngineOptions.names():  # one set of rules for engine options, wherever they are given
            value = EngineOptions().updated({f.name: raw}, origin).to_dict()[f.name]
        else:
            value = _convert(f, raw, origin)
            check_value(f.name, value, origin)
        setattr(self, f.name, value)
        self.origin[f.name] = origin

    def as_rows(self) -> list[tuple[str, str, str]]:
        """``(setting, value, origin)`` per setting, named ``section.key`` in :data:`KEYS` order."""
        return [
            (f"{k.section}.{k.name}", repr(getattr(self, k.field)), self.origin.get(k.field, "default")) for k in KEYS
        ]

    def sections(self) -> dict[str, list[tuple[str, str, str]]]:
        """``{section: [(key, value, origin)]}`` for ``lpfm config show``."""
        out: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SECTIONS}
        for k in KEYS:
            out[k.section].append((k.name, repr(getattr(self, k.field)), self.origin.get(k.field, "default")))
        return out

    def replace(self, **flags: Any) -> Settings:
        """A copy with command-line flags applied (None means "not given")."""
        new = dataclasses.replace(self, origin=dict(self.origin))
        new.apply({k: v for k, v in flags.items() if v is not None}, "flag")
        return new


def _known() -> str:
    return ", ".join(f"[{s}] " + " ".join(k.name for k in KEYS if k.section == s) for s in SECTIONS)


def _convert(f: dataclasses.Field, raw: Any, origin: str) -> Any:
    typ = str(f.type)
    try:
        if "bool" in typ:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "int" in typ:
            return int(raw)
        if "float" in typ:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {f.name}={raw!r} is not a valid {typ.split('|')[0].strip()}") from exc


def check_value(name: str, value: Any, origin: str = "flag") -> None:
    """Raise :class:`ConfigError` when ``value`` is outside what setting ``name`` allows (see :data:`LIMITS`)."""
    where = "--" + name.replace("_size", "").replace("_", "-") if origin == "flag" else origin
    if name in LIMITS and value is not None:
        lo, hi, fix = LIMITS[name]
        if not lo <= value <= hi:
            shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:20]}…"
            raise ConfigError(f"{where}: {name}={shown} is out of range ({lo}–{hi})", fix)
    if name in CHOICES and value is not None and str(value) not in CHOICES[name]:
        raise ConfigError(
            f"{where}: {name}={str(value)[:40]!r} is not one of {', '.join(CHOICES[name])}",
            f"use one of {', '.join(CHOICES[name])}",
        )


def check_mpp(mpp: float | None) -> None:
    """Raise :class:`ConfigError` unless ``mpp`` (µm per pixel) is None or a finite positive number."""
    import math

    if mpp is None:
        return
    if not isinstance(mpp, (int, float)) or isinstance(mpp, bool) or not math.isfinite(mpp) or mpp <= 0:
        raise ConfigError(f"--mpp {mpp} is not a pixel size", "give the size of one pixel in µm, e.g. --mpp 0.25")
    if mpp > 1e6:
        raise ConfigError(
            f"--mpp {mpp} µm (over a metre per pixel) is not a microscope pixel size",
            "give the size of one pixel in µm, e.g. --mpp 0.25",
        )


def load_settings(env: dict[str, str] | None = None, path: Path | None = None) -> Settings:
    """Defaults, then the user file (if any), then ``LPFM_*`` variables."""
    settings = Settings()
    path = path or config_path()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}", "fix or remove the file") from exc
        settings.apply(data.get("lpfm", data), str(path))
    env = os.environ if env is None else env
    for key in KEYS:
        for name in dict.fromkeys([*(f"{ENV_PREFIX}{o}".upper() for o in key.old), key.env]):  # current name last
            if env.get(name, "") != "":
                settings.apply({key.field: env[name]}, f"env:{name}")
    return settings
