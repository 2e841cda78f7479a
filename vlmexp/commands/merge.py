"""`python -m vlmexp merge RECIPE.yaml --out DIR`: write the recipe's merge as a checkpoint.

Models are folders or hub ids (`org/name[@revision]`, through the Hugging Face cache); the
written `recipe.yaml` pins each by its weights digest and each hub id by the commit it used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmexp.commands import add_model_flags
from vlmexp.errors import CheckpointError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a recipe in memory and write a complete checkpoint",
                       description=__doc__)
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--native-layout", action="store_true",
                   help="write in-memory tensor names instead of transformers' legacy names")
    p.add_argument("--no-digest-check", action="store_true",
                   help="merge even if a model's weights no longer match the recipe's digest")
    add_model_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmexp.config import check_device

    if args.device is not None:
        check_device(args.device, key="--device")
    from vlmexp.checkpoint import save_model
    from vlmexp.merge.engine import MergeEngine
    from vlmexp.merge.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    engine = MergeEngine.from_recipe(recipe, device=args.device,
                                     check_digests=not args.no_digest_check,
                                     trust_remote_code=args.trust_remote_code,
                                     allow_pickle=args.allow_pickle)
    result = engine.apply(recipe)
    save_model(engine.model, out, processor=engine.processor, source_dir=engine.sources["base"],
               force=args.force, native_layout=args.native_layout)
    pinned = engine.pin(recipe)
    pinned.save(out / "recipe.yaml")
    print(f"merged {result.merged} tensors ({result.seconds:.2f} s) -> {out}", file=sys.stderr)
    print(f"weights digest {result.weights_digest}", file=sys.stderr)
    return 0
