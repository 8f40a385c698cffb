"""Tools for the project's own development (not installed)."""
