"""`python -m vlmexp export RECIPE.yaml --format mergekit [--out FILE]`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a recipe as a mergekit configuration",
                       description=__doc__)
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--format", choices=["mergekit"], default="mergekit")
    p.add_argument("--out", default=None, help="output file (default: standard output)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmexp.merge.export import mergekit_config
    from vlmexp.merge.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe)
    text = yaml.safe_dump(mergekit_config(recipe), sort_keys=False, width=100)
    if args.out is None:
        print(text, end="")
    else:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    return 0
