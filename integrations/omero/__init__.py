"""omero."""
