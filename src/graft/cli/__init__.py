"""The `graft` command: one module per subcommand, each a thin layer over `graft`'s Python API."""


class Interrupted(Exception):
    """Ctrl-C in a command that can say how to go on; `graft.cli.main` prints it as one line, exit 130."""
