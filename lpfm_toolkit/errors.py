"""One exception family for the toolkit.

Every error is an :class:`LpfmError` and also the matching built-in (wsinfer's pattern), so callers
can catch either. ``hint`` says how to fix it; the CLI prints ``message — hint`` on one line.
"""

from __future__ import annotations


class LpfmError(Exception):
    """Base class of all toolkit errors."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class SlideNotFoundError(LpfmError, FileNotFoundError):
    """The image file (or server object) does not exist."""


class SlideUnreadableError(LpfmError, PermissionError):
    """The image file exists but this user may not read it."""


class UnsupportedFormatError(LpfmError, ValueError):
    """The file exists but no reader understands it."""


class CorruptImageError(LpfmError, ValueError):
    """The file looks like a known format but cannot be decoded (truncated, damaged)."""


class RegionError(LpfmError, ValueError):
    """A region or level lies outside the image."""


class PromptError(LpfmError, ValueError):
    """A prompt that maps to no known task."""


class TaskNotSupportedError(LpfmError, ValueError):
    """The chosen engine cannot perform this task on this input."""


class OutputExistsError(LpfmError, FileExistsError):
    """An output exists and was made by a different run."""


class ProvenanceError(LpfmError, ValueError):
    """A provenance record (sidecar or embedded OME-XML) is unreadable, incomplete, or disagrees with its copy."""


class OutputDamagedError(LpfmError, ValueError):
    """An output fails verification: truncated, edited, or not matching its recorded checksums."""

    exit_code = 1


class MissingDependencyError(LpfmError, ImportError):
    """An optional dependency is not installed."""


class ConfigError(LpfmError, ValueError):
    """A configuration value is invalid."""


class ModelError(LpfmError, ValueError):
    """A model bundle is missing, damaged, untrusted or does not match its checksums."""


class ConnectionFailedError(LpfmError, ConnectionError):
    """A remote system (OMERO) could not be reached or refused the session."""


class ProjectError(LpfmError, ValueError):
    """A QuPath project (or other container) is malformed or cannot be written."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise a :class:`MissingDependencyError` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised when the extra is absent
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module.split('.')[0]}' ({exc})",
            f"install it with: pip install 'lpfm-toolkit[{extra}]'",
        ) from exc
