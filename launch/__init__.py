"""The `hilum` command line, the typed config schema, run directories and resume lookup."""
