"""Command line: `python -m vlmexp COMMAND ...`.

Each command lives in `vlmexp/commands/<name>.py` with `register(subparsers)` and `run(args) -> int`.
Every `VlmexpError` is printed once, as one line, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# One explicit list; the order is the order of `--help`.
COMMANDS = ("inspect", "merge", "export", "evaluate", "search", "reproduce", "zoo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmexp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"vlmexp.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlmexp.errors import VlmexpError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except VlmexpError as err:
        print(f"vlmexp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlmexp {args.command}: interrupted", file=sys.stderr)
        return 130
