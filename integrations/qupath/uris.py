"""Image locations in QuPath projects: ``file:`` URIs, remapping and relative resolution.

QuPath stores each image as a ``file:/…`` URI with percent-encoded UTF-8 (``file:/D:/a%20b/x.svs`` on
Windows, ``file:/home/a/x.svs`` elsewhere). These functions are pure: they turn URIs into paths of the
right flavour (a Windows path stays a Windows path on Linux) and compute where a moved image may be now.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from urllib.parse import quote, unquote, urlsplit

from lpfm_toolkit.errors import ConfigError, ProjectError

_DRIVE = re.compile(r"^/?([A-Za-z]):(?:/|$)")
# Characters Java's java.net.URI accepts unescaped in a path (RFC 2396 pchar); everything else is %-encoded.
_URI_SAFE = "/:@!$&'()*+,;=-._~"


def path_from_uri(uri: str) -> PurePath:
    """The path a QuPath ``file:`` URI points to, as a Windows or POSIX pure path.

    ``file:/D:/x%20y/a.svs`` → ``PureWindowsPath('D:/x y/a.svs')``; ``file://server/share/a.svs`` → a UNC path.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        raise ProjectError(f"image URI {uri!r} is not a file: URI",
                           "only local files can be read; open the image in QuPath and export it to a file")
    path = unquote(parts.path, encoding="utf-8", errors="strict")
    netloc = unquote(parts.netloc)
    if netloc and netloc.lower() != "localhost":
        return PureWindowsPath(f"//{netloc}{path}")
    if _DRIVE.match(path):
        return PureWindowsPath(path.lstrip("/"))
    return PurePosixPath(path)


def uri_from_path(path: PurePath | str) -> str:
    """The ``file:`` URI QuPath writes for ``path`` (absolute), percent-encoding as ``java.net.URI`` does."""
    if isinstance(path, str):
        path = PureWindowsPath(path) if _is_windows(path) else PurePosixPath(path)
    p = path
    if isinstance(p, PureWindowsPath):
        text = PureWindowsPath(p).as_posix()
        if text.startswith("//"):  # UNC: file://server/share/...
            return "file:" + quote(text, safe=_URI_SAFE)
        return "file:/" + quote(text, safe=_URI_SAFE)
    if not p.is_absolute():
        raise ProjectError(f"path {str(p)!r} is not absolute", "QuPath projects store absolute image paths")
    return "file:" + quote(p.as_posix(), safe=_URI_SAFE)


def as_local(path: PurePath) -> Path | None:
    """``path`` as a concrete path on this machine, or None when its flavour cannot exist here."""
    local_flavour = type(PurePath())
    if type(path) is local_flavour or isinstance(path, Path):
        return Path(path)
    return None


def _norm(text: str) -> str:
    return text.replace("\\", "/").rstrip("/")


def _is_windows(text: str) -> bool:
    return bool(_DRIVE.match(text.replace("\\", "/"))) or text.startswith(("\\\\", "//"))


@dataclass(frozen=True)
class Remap:
    """Rewrite image paths that start with ``old`` to start with ``new`` (``--remap OLD=NEW``)."""

    old: str
    new: str

    @classmethod
    def parse(cls, text: str) -> Remap:
        """Parse ``OLD=NEW``; either side may be a path or a ``file:`` URI."""
        old, sep, new = text.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ConfigError(f"remap {text!r} is not OLD=NEW",
                              "write it as --remap /old/images=/new/images (or D:/slides=/mnt/slides)")
        old, new = old.strip(), new.strip()
        if old.lower().startswith("file:"):
            old = str(path_from_uri(old))
        if new.lower().startswith("file:"):
            new = str(path_from_uri(new))
        return cls(old, new)

    def apply(self, path: PurePath) -> Path | None:
        """The rewritten local path, or None when ``path`` does not start with ``old``."""
        text = _norm(str(path))
        old = _norm(self.old)
        windows = _is_windows(text) or _is_windows(old)
        head, tail = (text.lower(), old.lower()) if windows else (text, old)
        if head == tail:
            rest = ""
        elif head.startswith(tail + "/"):
            rest = text[len(old) + 1:]
        else:
            return None
        return Path(self.new).joinpath(*[p for p in rest.split("/") if p]) if rest else Path(self.new)


def relative_candidate(image: PurePath, old_project_file: PurePath, project_dir: Path) -> Path | None:
    """Where ``image`` is now if it moved together with the project (QuPath's own relative lookup).

    The image's position relative to the project's previous location is re-applied to its current
    directory; None when the two old paths share no root (e.g. different Windows drives).
    """
    if type(image) is not type(old_project_file):
        return None
    base = old_project_file.parent
    windows = isinstance(image, PureWindowsPath)
    if (image.anchor.lower() if windows else image.anchor) != (base.anchor.lower() if windows else base.anchor):
        return None
    a, b = base.parts[1:], image.parts[1:]
    same = (lambda x, y: x.lower() == y.lower()) if windows else (lambda x, y: x == y)
    common = 0
    while common < min(len(a), len(b)) and same(a[common], b[common]):
        common += 1
    rel = [".."] * (len(a) - common) + list(b[common:])
    if not rel:
        return None
    return Path(project_dir, *rel)


@dataclass(frozen=True)
class Resolution:
    """Where an image was found (or every place that was tried)."""

    path: Path | None
    how: str  # "stored", "remap", "relative" or "missing"
    tried: tuple[str, ...]


def resolve_image(uri: str, project_dir: Path, old_project_uri: str | None,
                  remaps: Sequence[Remap] = ()) -> Resolution:
    """Find the file of an image URI: ``--remap`` rules first, then the stored path, then relative to the project."""
    stored = path_from_uri(uri)
    tried: list[str] = []
    candidates: list[tuple[str, Path | None]] = [("remap", r.apply(stored)) for r in remaps]
    candidates.append(("stored", as_local(stored)))
    if old_project_uri:
        try:
            old_project = path_from_uri(old_project_uri)
        except ProjectError:
            old_project = None
        if old_project is not None:
            candidates.append(("relative", relative_candidate(stored, old_project, project_dir)))
    for how, cand in candidates:
        if cand is None:
            continue
        tried.append(str(cand))
        if cand.is_file():
            return Resolution(cand, how, tuple(tried))
    return Resolution(None, "missing", tuple(dict.fromkeys(tried)) or (str(stored),))


def parse_remaps(texts: Iterable[str]) -> list[Remap]:
    """Parse every ``--remap OLD=NEW``."""
    return [Remap.parse(t) for t in texts]
