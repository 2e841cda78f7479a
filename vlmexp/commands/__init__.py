"""One module per CLI command, each with `register(subparsers)`; listed in `vlmexp.cli.COMMANDS`."""

from __future__ import annotations

import argparse


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """`--trust-remote-code` and `--allow-pickle`, for every command that opens a model (both off
    by default; the config keys `models.trust_remote_code` / `models.allow_pickle` of `search`)."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run modeling code that a checkpoint ships (off by default)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="open pickle-only (.bin) checkpoints; unpickling can run arbitrary "
                             "code (off by default)")
