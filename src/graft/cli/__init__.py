"""The `graft` command: one module per subcommand, each a thin layer over `graft`'s Python API."""
