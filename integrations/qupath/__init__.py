"""QuPath projects as sources and sinks: read entries and annotations, add enhanced results as new entries.

``QuPathProject.open(path)`` uses paquo when a QuPath installation is found and the pure-Python file
backend otherwise; ``enhance_project`` runs a prompt over a project. Importing this package starts no JVM.
"""

from lpfm_toolkit.integrations.qupath.entries import ProjectEntry
from lpfm_toolkit.integrations.qupath.geojson import parse_geojson, read_geojson, write_geojson
from lpfm_toolkit.integrations.qupath.project import QuPathEntryHandle, QuPathProject
from lpfm_toolkit.integrations.qupath.uris import Remap, parse_remaps, path_from_uri, uri_from_path
from lpfm_toolkit.integrations.qupath.workflow import EntryItem, enhance_project, select_items

__all__ = [
    "EntryItem",
    "ProjectEntry",
    "QuPathEntryHandle",
    "QuPathProject",
    "Remap",
    "enhance_project",
    "parse_geojson",
    "parse_remaps",
    "path_from_uri",
    "read_geojson",
    "select_items",
    "uri_from_path",
    "write_geojson",
]
