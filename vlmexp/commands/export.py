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


def mergekit_config(recipe) -> dict:
    """The mergekit config of `recipe`, reading only the models' configs (weights stay on disk)."""
    import torch
    from transformers import AutoConfig

    from vlmexp.checkpoint import auto_model_class
    from vlmexp.layout import align, discover
    from vlmexp.merge.recipe import to_mergekit

    def skeleton(path: str) -> torch.nn.Module:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return auto_model_class(config).from_config(config)

    base = skeleton(recipe.base.path)
    donors = {d.name: skeleton(d.path) for d in recipe.donors}
    kinds = {name: align(base, model, vocab=recipe.vocab).kind for name, model in donors.items()}
    if all(kind == "same" for kind in kinds.values()):
        _check_native_layout("base", recipe.base.path, base)
        for d in recipe.donors:
            _check_native_layout(f"donor {d.name!r}", d.path, donors[d.name])
    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    return to_mergekit(recipe, discover(base), donor_kinds=kinds, out_dtype=dtype)


def _check_native_layout(what: str, path: str, model) -> None:
    """RecipeError unless the folder stores its tensors under the in-memory names.

    mergekit 0.1.5 reads the files itself and knows LLaVA-like models by their in-memory names:
    from a checkpoint in transformers' default (legacy) layout it silently leaves out what it
    does not recognise (a LLaVA's whole language model), so the export would not give the
    recipe's tensors.
    """
    from vlmexp.checkpoint import stored_tensor_names
    from vlmexp.errors import RecipeError

    stored = stored_tensor_names(path)
    foreign = sorted(stored - set(model.state_dict()))
    if foreign:
        raise RecipeError(
            f"{what}: {path} stores its tensors under transformers' legacy names (e.g. "
            f"{foreign[0]!r}), of which mergekit 0.1.5 silently drops part; re-save it with "
            f"save_pretrained(DIR, save_original_format=False) and point the recipe there")
