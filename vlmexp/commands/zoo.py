"""`python -m vlmexp zoo build [--dir DIR] [--force]`: train the offline demo model family.

Example:
    python -m vlmexp zoo build            # into .vlmexp_cache/zoo/<key>/, or $VLMEXP_ZOO_DIR
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("zoo", help="build the offline demo zoo (tiny LLaVA + experts)",
                                   description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="train base, vqa-expert and text-expert (about a minute)")
    build.add_argument("--dir", default=None,
                       help="cache root (default: $VLMEXP_ZOO_DIR or .vlmexp_cache/zoo)")
    build.add_argument("--force", action="store_true", help="rebuild even if the zoo is cached")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmexp.zoo.build import ensure_zoo

    paths = ensure_zoo(args.dir, force=args.force)
    manifest = json.loads((paths.root / "zoo.json").read_text())
    print(f"zoo: {paths.root}  (built in {manifest['seconds']['total']} s)")
    for name in ("base", "vqa_expert", "text_expert", "evals"):
        print(f"  {name:12s} {getattr(paths, name)}")
    return 0
