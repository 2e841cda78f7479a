"""Export a recipe as a mergekit 0.1.5 configuration that computes the same tensors.

`mergekit_config` reads only the models' configs (weights stay on disk) to learn the base's
layout and the donors' alignment, and refuses checkpoints mergekit would read wrongly; hub ids
are written at the commit they resolve to, in mergekit's own `org/name@revision` spelling;
`to_mergekit` writes the configuration from a recipe and a layout. Both raise RecipeError
naming what mergekit cannot express.

Example:
    >>> from vlmexp.merge.recipe import Recipe
    >>> config = mergekit_config(Recipe.from_yaml("recipe.yaml"))  # doctest: +SKIP
    >>> config["merge_method"]  # doctest: +SKIP
    'task_arithmetic'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmexp.checkpoint import ResolvedModel, model_skeleton, resolve_model, stored_tensor_names
from vlmexp.errors import RecipeError
from vlmexp.layout import Layout, align, discover
from vlmexp.merge.methods import METHODS, resolve_donor_params, resolve_params

if TYPE_CHECKING:
    from vlmexp.merge.recipe import ModelRef, Recipe


def mergekit_config(recipe: Recipe, *, trust_remote_code: bool = False,
                    allow_pickle: bool = False) -> dict[str, Any]:
    """The mergekit config of `recipe`, reading only the models' configs (weights stay on disk).

    Each model is resolved as `open_model` would (`checkpoint.resolve_model`: a folder, or a hub
    id at its recorded revision, else at the commit it resolves to now, which the config names).
    """
    sources = {"base": resolve_model(recipe.base.path, recipe.base.revision,
                                     allow_pickle=allow_pickle)}
    sources.update({d.name: resolve_model(d.path, d.revision, allow_pickle=allow_pickle)
                    for d in recipe.donors})

    opts = {"trust_remote_code": trust_remote_code}
    base = model_skeleton(sources["base"], **opts)
    donors = {d.name: model_skeleton(sources[d.name], **opts) for d in recipe.donors}
    kinds = {name: align(base, model, vocab=recipe.vocab).kind for name, model in donors.items()}
    if all(kind == "same" for kind in kinds.values()):
        _check_native_layout("base", sources["base"], base, allow_pickle=allow_pickle)
        for d in recipe.donors:
            _check_native_layout(f"donor {d.name!r}", sources[d.name], donors[d.name],
                                 allow_pickle=allow_pickle)
    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    pinned = recipe.with_revisions({name: s.revision for name, s in sources.items()})
    return to_mergekit(pinned, discover(base), donor_kinds=kinds, out_dtype=dtype)


def _check_native_layout(what: str, source: ResolvedModel, model: torch.nn.Module, *,
                         allow_pickle: bool = False) -> None:
    """RecipeError unless the folder stores its tensors under the in-memory names.

    mergekit 0.1.5 reads the files itself and knows LLaVA-like models by their in-memory names:
    from a checkpoint in transformers' default (legacy) layout it silently leaves out what it
    does not recognise (a LLaVA's whole language model), so the export would not give the
    recipe's tensors.
    """
    stored = stored_tensor_names(source.folder, allow_pickle=allow_pickle)
    foreign = sorted(stored - set(model.state_dict()))
    if foreign:
        raise RecipeError(
            f"{what}: {source.spec} stores its tensors under transformers' legacy names (e.g. "
            f"{foreign[0]!r}), of which mergekit 0.1.5 silently drops part; re-save it with "
            f"save_pretrained(DIR, save_original_format=False) and point the recipe there")


_VLMEXP_ONLY = {"base_weight", "use_base", "rescale_mode", "dot_threshold", "epsilon"}


def to_mergekit(recipe: Recipe, layout: Layout, *, donor_kinds: Mapping[str, str] | None = None,
                out_dtype: str | None = None) -> dict[str, Any]:
    """A mergekit 0.1.5 configuration that computes the same tensors as `recipe`.

    vlmexp resolves every parameter per tensor (component, depth schedule, take, components
    left to the base); the export writes each parameter as one value or as a list of mergekit
    `filter` conditions on full tensor names (longest names first, since mergekit takes the first
    condition whose filter is a substring of the name), so mergekit needs no layer structure of
    its own. Raises RecipeError naming what mergekit cannot express.

    Args:
        layout: the base's `vlmexp.layout.Layout` (tensor names, components, depths).
        donor_kinds: donor name → alignment kind ("same" / "llm_to_vlm"), when known.
        out_dtype: mergekit's output dtype (the base's dtype), e.g. "float32".
    """
    spec = METHODS[recipe.method]
    if spec.mergekit is None:
        raise RecipeError(f"method {recipe.method!r} has no mergekit equivalent")
    for name, kind in (donor_kinds or {}).items():
        if kind != "same":
            raise RecipeError(f"donor {name!r} is a {kind} donor; mergekit merges models of one "
                              f"architecture only")
    resolved = resolve_params(recipe.method, recipe.parameters)
    if resolved.get("rescale_mode", "mergekit") != "mergekit":
        raise RecipeError("parameters.rescale_mode: mergekit only has its own L1-norm rescale")
    for key in _VLMEXP_ONLY - {"base_weight", "use_base"}:
        pdef = next((p for p in spec.method_params if p.name == key), None)
        if pdef is not None and key in recipe.parameters and recipe.parameters[key] != pdef.default:
            raise RecipeError(f"parameters.{key}: mergekit has no such setting; only the default "
                              f"{pdef.default!r} exports")
    if recipe.method == "slerp" and len(recipe.donors) > 1:
        raise RecipeError("mergekit's slerp takes the base and exactly one donor; the recipe "
                          f"has {len(recipe.donors)} donors")
    task_family = spec.consensus is not None or spec.sparsification is not None or (
        recipe.method == "task_arithmetic")

    def tensor_settings(name: str, info: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """(model key -> params, method params) for one tensor; model key "base" or a donor."""
        comp = info.component
        method_params = {k: v for k, v in resolved.items() if k not in _VLMEXP_ONLY}
        models: dict[str, dict[str, Any]] = {}
        if comp in recipe.take:
            chosen = recipe.take[comp]
            if recipe.method == "slerp":
                models = {chosen: {"t": 1.0}}
            elif recipe.method == "linear":
                models = {"base": {"weight": 0.0}}
                models.update({d: {"weight": 1.0 if d == chosen else 0.0}
                               for d in recipe.donor_names})
                method_params["normalize"] = True
            elif task_family:
                models = {d: {"weight": 1.0 if d == chosen else 0.0, "density": 1.0}
                          for d in recipe.donor_names}
                method_params.update({"lambda": 1.0, "normalize": False})
            else:
                raise RecipeError(f"take.{comp}: mergekit's {spec.mergekit} cannot copy one "
                                  f"component from a donor")
            return models, method_params
        participants = recipe.participants(comp)
        for d in recipe.donor_names:
            if d in participants:
                models[d] = resolve_donor_params(recipe.method, recipe.resolve(comp, d, info.depth))
            elif recipe.method == "slerp" and participants:
                continue
            elif recipe.method == "slerp":
                models[d] = {"t": 0.0}
            elif recipe.method in ("linear",) or task_family:
                models[d] = {p.name: (0.0 if p.name == "weight" else p.default)
                             for p in spec.donor_params}
            else:
                what = f"component {comp!r}" if not participants else f"donor {d!r} in {comp!r}"
                raise RecipeError(f"mergekit's {spec.mergekit} cannot leave {what} out of the "
                                  f"merge; list every donor in every component")
        if recipe.method == "linear":
            models["base"] = {"weight": resolved["base_weight"] if participants else 1.0}
        return models, method_params

    per_tensor = {name: tensor_settings(name, info) for name, info in layout.params.items()}
    if recipe.method == "slerp":  # mergekit's slerp takes t as a method parameter
        for models, method_params in per_tensor.values():
            method_params["t"] = next(iter(models.values()))["t"]
            models.clear()
    names = sorted(per_tensor, key=lambda n: (-len(n), n))

    def setting(values: dict[str, Any]) -> Any:
        """One value, or filter conditions for the tensors that differ from the most common."""
        counts: dict[str, int] = {}
        for v in values.values():
            counts[json.dumps(v)] = counts.get(json.dumps(v), 0) + 1
        common = json.loads(max(counts, key=lambda k: counts[k]))
        odd = {n for n, v in values.items() if v != common}
        if not odd:
            return common
        # a default-valued tensor whose name contains an odd filter would match it: pin it too
        odd |= {n for n in values if n not in odd and any(o in n for o in odd if o != n)}
        return [{"filter": n, "value": values[n]} for n in names if n in odd] + [{"value": common}]

    model_keys = (["base"] if recipe.method in ("linear", "slerp") else []) + recipe.donor_names
    models_out = []
    paths = {"base": _mergekit_path(recipe.base),
             **{d.name: _mergekit_path(d) for d in recipe.donors}}
    for key in model_keys:
        keyed = {n: s[0].get(key) for n, s in per_tensor.items()}
        if all(v is None for v in keyed.values()) and recipe.method != "slerp":
            continue
        param_names = sorted({p for v in keyed.values() if v for p in v})
        params_out = {}
        for p in param_names:
            params_out[p] = setting({n: (v or {}).get(p, 0.0) for n, v in keyed.items()})
        entry: dict[str, Any] = {"model": paths[key]}
        if params_out:
            entry["parameters"] = params_out
        models_out.append(entry)
    method_names = sorted({p for s in per_tensor.values() for p in s[1]})
    config: dict[str, Any] = {"merge_method": spec.mergekit}
    if recipe.method != "linear" and resolved.get("use_base", True):
        config["base_model"] = _mergekit_path(recipe.base)
    config["models"] = models_out
    if method_names:
        config["parameters"] = {p: setting({n: s[1][p] for n, s in per_tensor.items()})
                                for p in method_names}
    config["dtype"] = recipe.dtype
    if out_dtype:
        config["out_dtype"] = out_dtype
    return config


def _mergekit_path(ref: ModelRef) -> str:
    """mergekit reads a bare relative name as a hub id: give local folders as absolute paths, and
    a hub id at its recorded commit in mergekit's own `org/name@revision` spelling."""
    if ref.revision:
        return f"{ref.path.split('@', 1)[0]}@{ref.revision}"
    return str(Path(ref.path).resolve()) if Path(ref.path).is_dir() else ref.path
