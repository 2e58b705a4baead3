"""QuPath entries as job sources (``kind = "qupath"``), resolved by :mod:`lpfm_toolkit.jobs.sources`.

The worker reads the entry's image and writes an OME-TIFF; the coordinator adds it to the project as a new
entry (the ``file`` backend: the project's JSON files, no QuPath or Java needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lpfm_toolkit.errors import ProjectError


class QuPathSource:
    """``source`` is the ``project.qpproj``, ``entry`` the entry ID; ``out`` (or the project's lpfm-outputs)."""

    def open(self, spec: Any) -> Any:
        from lpfm_toolkit.integrations.qupath import QuPathProject, parse_remaps

        project = QuPathProject.open(spec.source, backend="file", remaps=parse_remaps(list(spec.remaps)), readonly=True)
        return project.open_entry(project.entry(spec.entry or ""))

    def output_dir(self, spec: Any) -> Path:
        if spec.out:
            return Path(spec.out)
        from lpfm_toolkit.integrations.qupath.project import DEFAULT_OUTPUT_DIR

        return Path(spec.source).parent / DEFAULT_OUTPUT_DIR

    def sink(self, spec: Any, handle: Any) -> Any:
        from lpfm_toolkit.jobs.spec import marked_sink

        return marked_sink(self.output_dir(spec), spec.compression, spec.tiff_tile, spec.name)

    def finalize(self, spec: Any, result: Any) -> str:
        """Add the result as a new entry (once: an entry with the same key is reused); ``<file>#entry=<ID>``."""
        from lpfm_toolkit.integrations.qupath import QuPathProject, parse_remaps

        if not result.uri:  # an --auto job that QC found nothing to enhance in: no output, no entry
            return ""
        with QuPathProject.open(spec.source, backend="file", remaps=parse_remaps(list(spec.remaps))) as project:
            entry = project.entry(spec.entry or "")
            sink = project.sink(
                entry, self.output_dir(spec), compression=spec.compression, tile=spec.tiff_tile, name=spec.name
            )
            image = Path(result.uri)  # where the worker wrote it, whatever the file name template
            ref = sink.find_file(result.key, image) if image.is_file() else sink.find(result.key, result.name)
        if ref is None:
            raise ProjectError(
                f"the result {result.uri} of entry {spec.entry} disappeared before it was added", "retry the job"
            )
        return f"{ref.uri}#entry={ref.extra.get('entry_id')}"

    def failed(self, spec: Any, error: str) -> None:
        return None
