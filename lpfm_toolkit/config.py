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
    "samples": (1, 64, "use 1 (no uncertainty map) up to 64 samples"),
    "steps": (0, 1000, "use 0 (restorer only) up to 1000 diffusion steps"),
    "seed": (0, 2**63 - 1, "use a seed from 0 to 2**63-1"),
    "omero_port": (1, 65535, "use a TCP port from 1 to 65535"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "engine": ("auto", "lpfm", "classical", "identity"),
    "compression": ("auto", "jpeg", "zlib", "zstd", "lzw", "none"),
    "tiff_tile": ("256", "512"),
}


def config_path() -> Path:
    """``$LPFM_CONFIG``, else ``$XDG_CONFIG_HOME/lpfm/config.toml`` (``~/.config/lpfm/config.toml``)."""
    if os.environ.get("LPFM_CONFIG"):
        return Path(os.environ["LPFM_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "lpfm" / "config.toml"


@dataclass
class Settings:
    """Effective settings; ``origin[name]`` is ``default``, the file path, ``env:NAME`` or ``flag``."""

    engine: str = "auto"
    method: str | None = None
    model: str | None = None
    device: str | None = None
    steps: int | None = None
    samples: int = 1
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
    origin: dict[str, str] = field(default_factory=dict, repr=False)

    def apply(self, values: dict[str, Any], origin: str) -> None:
        """Override fields from ``values`` (None values are ignored), converting types."""
        known = {f.name: f for f in fields(self) if f.name != "origin"}
        for key, raw in values.items():
            key = key.replace("-", "_").lower()
            if any(word in key for word in FORBIDDEN):
                raise ConfigError(
                    f"{origin} sets {key!r}: secrets are not read from configuration",
                    "give passwords through OMERO_PASSWORD or the prompt, never a file",
                )
            if key not in known:
                raise ConfigError(f"{origin}: unknown setting {key!r}", f"known: {', '.join(sorted(known))}")
            if raw is None:
                continue
            value = _convert(known[key], raw, origin)
            check_value(key, value, origin)
            setattr(self, key, value)
            self.origin[key] = origin

    def as_rows(self) -> list[tuple[str, str, str]]:
        return [
            (f.name, repr(getattr(self, f.name)), self.origin.get(f.name, "default"))
            for f in fields(self)
            if f.name != "origin"
        ]

    def replace(self, **flags: Any) -> Settings:
        """A copy with command-line flags applied (None means "not given")."""
        new = dataclasses.replace(self, origin=dict(self.origin))
        new.apply({k: v for k, v in flags.items() if v is not None}, "flag")
        return new


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
    names = {f.name for f in fields(Settings) if f.name != "origin"}
    from_env = {
        k[len(ENV_PREFIX) :].lower(): v
        for k, v in env.items()
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() in names
    }
    for key, value in from_env.items():
        settings.apply({key: value}, f"env:{ENV_PREFIX}{key.upper()}")
    return settings
