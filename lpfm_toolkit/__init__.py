"""lpfm-toolkit: a unified low-level pathology foundation model in the tools labs already use.

Importing the package is cheap: torch, omero and paquo are imported only when a feature needs them.
"""

from lpfm_toolkit._version import __version__
from lpfm_toolkit.errors import LpfmError
from lpfm_toolkit.prompts import Task, TaskKind, parse_prompt
from lpfm_toolkit.provenance import Provenance

__all__ = ["__version__", "LpfmError", "Task", "TaskKind", "parse_prompt", "Provenance", "open_image"]


def open_image(path, **kwargs):
    """Open a local slide or image file (see :func:`lpfm_toolkit.sources.open_image`)."""
    from lpfm_toolkit.sources import open_image as _open

    return _open(path, **kwargs)
