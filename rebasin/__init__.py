"""rebasin."""
