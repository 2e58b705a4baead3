"""Sources: local files here; QuPath and OMERO sources live in ``lpfm_toolkit.integrations``."""

from lpfm_toolkit.sources.base import Annotation, ImageHandle, Level, Region
from lpfm_toolkit.sources.local import open_local as open_image

__all__ = ["Annotation", "ImageHandle", "Level", "Region", "open_image"]
