"""The ``docqa`` command (top of the import graph: it mounts every package's subcommands)."""
