"""One module per CLI command, each with `register(subparsers)`; listed in `vlmexp.cli.COMMANDS`."""
