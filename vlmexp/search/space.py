"""The search space: turns an Optuna trial into a Recipe, and a Recipe back into trial parameters.

A space names, per component and donor, each method parameter as a range `[low, high]` (searched)
or a plain value (fixed); method-level parameters likewise; optionally K knots over depth for a
component (a depth schedule: K searched values, linearly interpolated); optionally a choice of
methods; components pinned to the base or taken verbatim from a donor; `tie` for groups of
components that share one value per donor (e.g. the language model with its embeddings and
head); and `shared` for one value per donor across all components (a global merge).

Optuna parameter names: `{component}.{donor}.{param}` (`.{k}` for knot k), `{c1+c2+...}.{donor}.
{param}` for a tied group, `{donor}.{param}` when shared, `parameters.{name}` for method-level
ones, `method` for the method choice.

Example:
    >>> from vlmexp.merge.recipe import ModelRef
    >>> space = SearchSpace({"components": {"language": {"vqa": {"weight": [0.0, 1.0]}}}},
    ...                     {"method": "task_arithmetic"}, ModelRef("base", "b"),
    ...                     [ModelRef("vqa", "v")])
    >>> space.recipe_from_params({"language.vqa.weight": 0.25}).components
    {'language': {'vqa': {'weight': 0.25}}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlmexp.errors import ConfigError, RecipeError
from vlmexp.layout import COMPONENTS, Layout, inert
from vlmexp.merge.recipe import ModelRef, Recipe

Slot = tuple[str | None, str | None, str, int | None]  # (component, donor, parameter, knot)
METHOD_PARAM = "method"  # the Optuna parameter of a method choice (`space.methods`)


def _is_range(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _is_choice(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and not _is_range(value) and len(value) > 0


class SearchSpace:
    """Per-component merge parameters as Optuna distributions (see the module docstring).

    Args:
        space: the `space` config (components, parameters, knots, methods, pin, take, tie, shared).
        merge: the `merge` config (method, parameters, dtype, seed, vocab).
        base: the base model reference; donors: the donors, in recipe order.
        layout: the base's layout and `reach`, donor → {component: tensors its task vector
            reaches} (`Alignment.reach`): given both, a component or donor setting that cannot
            change the model is a ConfigError (`layout.inert`).
    """

    def __init__(self, space: Mapping[str, Any], merge: Mapping[str, Any], base: ModelRef,
                 donors: Sequence[ModelRef], *, layout: Layout | None = None,
                 reach: Mapping[str, Mapping[str, int]] | None = None) -> None:
        self.components: dict[str, dict[str, dict[str, Any]]] = {
            str(c): {str(d): dict(p or {}) for d, p in (v or {}).items()}
            for c, v in (space.get("components") or {}).items()}
        self.method_space: dict[str, Any] = dict(space.get("parameters") or {})
        self.knots: dict[str, int] = {str(k): int(v) for k, v in (space.get("knots") or {}).items()}
        self.methods: list[str] = list(space.get("methods") or []) or [str(merge["method"])]
        self.pin: list[str] = list(space.get("pin") or [])
        self.take: dict[str, str] = dict(space.get("take") or {})
        self.shared: bool = bool(space.get("shared", False))
        self.tie: list[list[str]] = [[str(c) for c in group] for group in (space.get("tie") or [])]
        self._label: dict[str, str] = {c: "+".join(g) for g in self.tie for c in g}
        self.fixed_parameters: dict[str, Any] = dict(merge.get("parameters") or {})
        self.dtype = str(merge.get("dtype", "float32"))
        self.seed = int(merge.get("seed", 0))
        self.vocab = str(merge.get("vocab", "error"))
        self.base = base
        self.donors = list(donors)
        self._check_components()
        if layout is not None and reach is not None:
            self._check_reach(layout, reach)
        self.param_names = self._param_names()
        self._check()

    # ------------------------------------------------------------------ checks
    def _check_components(self) -> None:
        names = {d.name for d in self.donors}
        for comp, per_donor in self.components.items():
            if comp not in COMPONENTS:
                raise ConfigError(f"space.components.{comp}: unknown component "
                                  f"(known: {', '.join(COMPONENTS)})")
            for donor in per_donor:
                if donor not in names:
                    raise ConfigError(f"space.components.{comp}.{donor}: unknown donor "
                                      f"(models.donors: {', '.join(sorted(names))})")

    def _check_reach(self, layout: Layout, reach: Mapping[str, Mapping[str, int]]) -> None:
        """Every setting must be able to change the model: a component the base has, a donor
        whose task vector reaches it."""
        for comp, per_donor in self.components.items():
            if comp in self.pin or comp in self.take:
                continue
            for donor in per_donor:
                why = inert(comp, layout, reach.get(donor, {}), donor)
                if why:
                    raise ConfigError(f"space.components.{comp}.{donor}: {why}")
        for comp, donor in self.take.items():
            why = inert(comp, layout, reach.get(donor, {}), donor)
            if why:
                raise ConfigError(f"space.take.{comp}: {why}")
        for comp in self.pin:
            why = inert(comp, layout)
            if why:
                raise ConfigError(f"space.pin: {comp}: {why}")

    def _check(self) -> None:
        takes = {p.name for m in self.methods for p in self._method_spec(m).donor_params}
        method_takes = {p.name for m in self.methods for p in self._method_spec(m).method_params}
        for comp, per_donor in self.components.items():
            for donor, params in per_donor.items():
                for key in params:
                    if key not in takes:
                        raise ConfigError(f"space.components.{comp}.{donor}.{key}: no method of "
                                          f"{', '.join(self.methods)} takes {key!r}")
        for key in self.method_space:
            if key not in method_takes:
                raise ConfigError(f"space.parameters.{key}: no method of "
                                  f"{', '.join(self.methods)} takes {key!r}")
        for comp, k in self.knots.items():
            if comp not in self.components:
                raise ConfigError(f"space.knots.{comp}: the component is not in space.components")
            if k < 1:
                raise ConfigError(f"space.knots.{comp}: needs at least 1 knot, got {k}")
            if self.shared:
                raise ConfigError("space.knots: depth schedules need per-component parameters; "
                                  "set space.shared=false")
        for comp in [*self.pin, *self.take]:
            if comp not in COMPONENTS:
                raise ConfigError(f"space: unknown component {comp!r} in pin/take")
        self._check_tie()
        # the extremes of every range must make valid recipes
        for method in self.methods:
            for end in (0, 1):
                try:
                    self.recipe_from_params(self._corner(method, end))
                except RecipeError as err:
                    raise ConfigError(f"space: {err}") from None

    def _check_tie(self) -> None:
        if self.tie and self.shared:
            raise ConfigError("space.tie: shared=true already ties every component; use one")
        seen: set[str] = set()
        for group in self.tie:
            label = "+".join(group)
            if len(group) < 2:
                raise ConfigError(f"space.tie: group [{', '.join(group)}] needs 2 or more "
                                  "components")
            for comp in group:
                if comp not in self.components:
                    raise ConfigError(f"space.tie.{label}: {comp!r} is not in space.components")
                if comp in seen:
                    raise ConfigError(f"space.tie: {comp!r} is in two groups")
                if comp in self.knots:
                    raise ConfigError(f"space.tie.{label}: {comp!r} has knots; a tied group "
                                      "shares one value")
                seen.add(comp)
            specs: dict[tuple[str, str], Any] = {}
            for comp in group:
                for donor, params in self.components[comp].items():
                    for key, value in params.items():
                        if specs.setdefault((donor, key), value) != value:
                            raise ConfigError(
                                f"space.tie.{label}: {donor}.{key} differs between its "
                                f"components ({specs[(donor, key)]!r} vs {value!r} in {comp})")

    def _corner(self, method: str, end: int) -> dict[str, Any]:
        params: dict[str, Any] = {METHOD_PARAM: method} if len(self.methods) > 1 else {}
        for name, value in self._searched(method):
            params[name] = value[end] if _is_range(value) else value[0]
        return params

    # ------------------------------------------------------------------ the parameters
    def _method_spec(self, method: str):
        from vlmexp.merge.methods import METHODS

        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
        return METHODS[method]

    def _param_names(self) -> dict[Slot, str]:
        """The one table of Optuna parameter names: (component, donor, parameter, knot) → name.

        Method-level parameters have component and donor None; `knot` is None except in a
        depth schedule. Tied components (and, with `shared`, all components) map to one name.
        """
        names: dict[Slot, str] = {}
        for key, value in self.method_space.items():
            if _is_range(value) or _is_choice(value):
                names[(None, None, key, None)] = f"parameters.{key}"
        for comp in self._merged_components():
            for donor, params in self.components[comp].items():
                for key, value in params.items():
                    if not (_is_range(value) or _is_choice(value)):
                        continue
                    if self.shared:
                        names[(comp, donor, key, None)] = f"{donor}.{key}"
                    elif comp in self.knots and _is_range(value):
                        for k in range(self.knots[comp]):
                            names[(comp, donor, key, k)] = f"{comp}.{donor}.{key}.{k}"
                    else:
                        names[(comp, donor, key, None)] = (f"{self._label.get(comp, comp)}."
                                                           f"{donor}.{key}")
        return names

    def _searched(self, method: str) -> list[tuple[str, Any]]:
        """(optuna name, range or choice list) for every searched parameter of `method`."""
        spec = self._method_spec(method)
        keys = {p.name for p in spec.method_params}, {p.name for p in spec.donor_params}
        out: dict[str, Any] = {}
        for (comp, donor, key, _), name in self.param_names.items():
            if key in keys[comp is not None] and name not in out:
                out[name] = (self.method_space[key] if comp is None
                             else self.components[comp][donor][key])
        return list(out.items())

    def _slots(self, name: str) -> list[Slot]:
        return [slot for slot, n in self.param_names.items() if n == name]

    def changed_components(self) -> set[str]:
        """The components any recipe of this space can change (merged or taken): the engine
        keeps base copies and task vectors for these only."""
        return {*self._merged_components(), *self.take}

    def _merged_components(self) -> list[str]:
        return [c for c in self.components if c not in self.pin and c not in self.take]

    # ------------------------------------------------------------------ trial <-> recipe
    def suggest(self, trial: Any) -> Recipe:
        """Ask `trial` for every searched parameter and build the recipe."""
        params: dict[str, Any] = {}
        method = self.methods[0]
        if len(self.methods) > 1:
            method = trial.suggest_categorical(METHOD_PARAM, self.methods)
            params[METHOD_PARAM] = method
        for name, value in self._searched(method):
            if _is_range(value):
                params[name] = trial.suggest_float(name, float(value[0]), float(value[1]))
            else:
                params[name] = trial.suggest_categorical(name, list(value))
        return self.recipe_from_params(params)

    def recipe_from_params(self, params: Mapping[str, Any]) -> Recipe:
        """The recipe for a full set of trial parameters (as `trial.params` holds them)."""
        method = str(params.get(METHOD_PARAM, self.methods[0]))
        spec = self._method_spec(method)
        donor_keys = {p.name for p in spec.donor_params}
        method_keys = {p.name for p in spec.method_params}
        parameters = {k: v for k, v in self.fixed_parameters.items() if k in method_keys}
        names = self.param_names
        for key, value in self.method_space.items():
            if key in method_keys:
                name = names.get((None, None, key, None))
                parameters[key] = value if name is None else params[name]
        components: dict[str, dict[str, dict[str, Any]]] = {}
        for comp in self._merged_components():
            for donor, space_params in self.components[comp].items():
                values: dict[str, Any] = {}
                for key, value in space_params.items():
                    if key not in donor_keys:
                        continue
                    if (comp, donor, key, 0) in names:  # a depth schedule
                        knots = [params[names[(comp, donor, key, k)]]
                                 for k in range(self.knots[comp])]
                        values[key] = knots if len(knots) > 1 else knots[0]
                    elif (comp, donor, key, None) in names:
                        values[key] = params[names[(comp, donor, key, None)]]
                    else:
                        values[key] = value
                components.setdefault(comp, {})[donor] = values
        return Recipe.from_dict({
            "vlmexp_recipe": 1, "method": method,
            "base": self.base.to_dict(with_name=False),
            "donors": [d.to_dict() for d in self.donors],
            "parameters": parameters, "components": components, "take": dict(self.take),
            "dtype": self.dtype, "seed": self.seed, "vocab": self.vocab,
        }, source="search space")

    def params_for(self, recipe: Recipe) -> dict[str, Any] | None:
        """Trial parameters that give `recipe`, or None when the space cannot express it."""
        if recipe.method not in self.methods:
            return None
        params: dict[str, Any] = {METHOD_PARAM: recipe.method} if len(self.methods) > 1 else {}
        for name, value in self._searched(recipe.method):
            found: set[str] = set()
            got = None
            for comp, donor, key, knot in self._slots(name):
                if comp is None:
                    v = recipe.parameters.get(key)
                else:
                    v = recipe.components.get(comp, {}).get(donor, {}).get(key)
                    if knot is not None and isinstance(v, list):
                        v = v[knot] if len(v) == self.knots[comp] else None
                found.add(json_key(v))
                got = v if got is None else got
            if len(found) != 1 or got is None:  # tied slots must hold one value
                return None
            if _is_range(value) and not float(value[0]) <= float(got) <= float(value[1]):
                return None
            if _is_choice(value) and got not in value:
                return None
            params[name] = got
        rebuilt = self.recipe_from_params(params)
        return params if _normalized(rebuilt) == _normalized(recipe) else None

    # ------------------------------------------------------------------ baselines
    def baselines(self) -> list[tuple[str, Recipe]]:
        """The base alone, each donor alone, and the uniform average of all models.

        As task-arithmetic recipes over the components the space merges: weight 0 (the base),
        weight 1 for one donor (that donor, where it has the component), 1/(N+1) for every donor
        (the plain average of the base and the N donors).
        """
        comps = self._merged_components()
        names = [d.name for d in self.donors]

        def weights(w: Mapping[str, float]) -> Recipe:
            components = {c: {d: {"weight": w[d]} for d in self.components[c] if w[d] != 0}
                          for c in comps}
            return Recipe.from_dict({
                "method": "task_arithmetic", "base": self.base.to_dict(with_name=False),
                "donors": [d.to_dict() for d in self.donors],
                "components": {c: v for c, v in components.items() if v},
                "take": dict(self.take), "dtype": self.dtype, "seed": self.seed,
                "vocab": self.vocab}, source="baseline")

        out = [("base", weights(dict.fromkeys(names, 0.0)))]
        out += [(f"{n} alone", weights({d: 1.0 if d == n else 0.0 for d in names})) for n in names]
        out.append(("uniform average", weights(dict.fromkeys(names, 1.0 / (len(names) + 1)))))
        return out

    def baseline_params(self, recipe: Recipe) -> dict[str, Any] | None:
        """Trial parameters for a baseline recipe: its weights in this space's terms.

        A baseline is task arithmetic; in a task-arithmetic space (density 1 where searched)
        that is the same recipe, so its weights become the trial's parameters.
        """
        if recipe.method not in self.methods:
            return None
        filled = recipe.to_dict()
        for comp in self._merged_components():
            for donor, space_params in self.components[comp].items():
                entry = filled["components"].setdefault(comp, {}).setdefault(donor, {})
                entry.setdefault("weight", 0.0)
                for key, value in space_params.items():
                    if key != "weight":
                        entry.setdefault(key, value if not (_is_range(value) or _is_choice(
                            value)) else 1.0)
        filled["components"] = {c: v for c, v in filled["components"].items() if v}
        try:
            candidate = Recipe.from_dict(filled)
        except RecipeError:
            return None
        return self.params_for(candidate)


def _normalized(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a dict with method-level defaults filled (unset == set to the default)."""
    from vlmexp.merge.methods import resolve_params

    data = recipe.to_dict()
    data["parameters"] = resolve_params(recipe.method, recipe.parameters)
    return data


def json_key(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)
