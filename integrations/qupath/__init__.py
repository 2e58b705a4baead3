"""qupath."""
