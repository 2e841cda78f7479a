"""`python -m vlmexp export RECIPE.yaml --format mergekit [--out FILE]`.

Hub ids are written at the commit they resolve to (mergekit's `org/name@revision`), local
folders as absolute paths.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from vlmexp.commands import add_model_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a recipe as a mergekit configuration",
                       description=__doc__)
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--format", choices=["mergekit"], default="mergekit")
    p.add_argument("--out", default=None, help="output file (default: standard output)")
    add_model_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmexp.merge.export import mergekit_config
    from vlmexp.merge.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe)
    config = mergekit_config(recipe, trust_remote_code=args.trust_remote_code,
                             allow_pickle=args.allow_pickle)
    text = yaml.safe_dump(config, sort_keys=False, width=100)
    if args.out is None:
        print(text, end="")
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    return 0
