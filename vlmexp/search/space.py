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
from vlmexp.layout import COMPONENTS
from vlmexp.merge.recipe import ModelRef, Recipe


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
    """

    def __init__(self, space: Mapping[str, Any], merge: Mapping[str, Any], base: ModelRef,
                 donors: Sequence[ModelRef]) -> None:
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
        self._check()

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        names = {d.name for d in self.donors}
        for comp, per_donor in self.components.items():
            if comp not in COMPONENTS:
                raise ConfigError(f"space.components.{comp}: unknown component "
                                  f"(known: {', '.join(COMPONENTS)})")
            for donor in per_donor:
                if donor not in names:
                    raise ConfigError(f"space.components.{comp}.{donor}: unknown donor "
                                      f"(models.donors: {', '.join(sorted(names))})")
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
        params: dict[str, Any] = {"method": method} if len(self.methods) > 1 else {}
        for name, value in self._searched(method):
            params[name] = value[end] if _is_range(value) else value[0]
        return params

    # ------------------------------------------------------------------ the parameters
    def _method_spec(self, method: str):
        from vlmexp.merge.methods import METHODS

        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
        return METHODS[method]

    def _searched(self, method: str) -> list[tuple[str, Any]]:
        """(optuna name, range or choice list) for every searched parameter of `method`."""
        spec = self._method_spec(method)
        donor_keys = {p.name for p in spec.donor_params}
        method_keys = {p.name for p in spec.method_params}
        out: list[tuple[str, Any]] = []
        for key, value in self.method_space.items():
            if key in method_keys and (_is_range(value) or _is_choice(value)):
                out.append((f"parameters.{key}", value))
        seen: set[str] = set()
        for comp in self._merged_components():
            for donor, params in self.components[comp].items():
                for key, value in params.items():
                    if key not in donor_keys or not (_is_range(value) or _is_choice(value)):
                        continue
                    if self.shared:
                        name = f"{donor}.{key}"
                        if name not in seen:
                            seen.add(name)
                            out.append((name, value))
                    elif comp in self.knots and _is_range(value):
                        out += [(f"{comp}.{donor}.{key}.{k}", value)
                                for k in range(self.knots[comp])]
                    else:
                        name = f"{self._label.get(comp, comp)}.{donor}.{key}"
                        if name not in seen:
                            seen.add(name)
                            out.append((name, value))
        return out

    def _merged_components(self) -> list[str]:
        return [c for c in self.components if c not in self.pin and c not in self.take]

    # ------------------------------------------------------------------ trial <-> recipe
    def suggest(self, trial: Any) -> Recipe:
        """Ask `trial` for every searched parameter and build the recipe."""
        params: dict[str, Any] = {}
        method = self.methods[0]
        if len(self.methods) > 1:
            method = trial.suggest_categorical("method", self.methods)
            params["method"] = method
        for name, value in self._searched(method):
            if _is_range(value):
                params[name] = trial.suggest_float(name, float(value[0]), float(value[1]))
            else:
                params[name] = trial.suggest_categorical(name, list(value))
        return self.recipe_from_params(params)

    def recipe_from_params(self, params: Mapping[str, Any]) -> Recipe:
        """The recipe for a full set of trial parameters (as `trial.params` holds them)."""
        method = str(params.get("method", self.methods[0]))
        spec = self._method_spec(method)
        donor_keys = {p.name for p in spec.donor_params}
        method_keys = {p.name for p in spec.method_params}
        parameters = {k: v for k, v in self.fixed_parameters.items() if k in method_keys}
        for key, value in self.method_space.items():
            if key not in method_keys:
                continue
            searched = _is_range(value) or _is_choice(value)
            parameters[key] = params[f"parameters.{key}"] if searched else value
        components: dict[str, dict[str, dict[str, Any]]] = {}
        for comp in self._merged_components():
            for donor, space_params in self.components[comp].items():
                values: dict[str, Any] = {}
                for key, value in space_params.items():
                    if key not in donor_keys:
                        continue
                    if not (_is_range(value) or _is_choice(value)):
                        values[key] = value
                    elif self.shared:
                        values[key] = params[f"{donor}.{key}"]
                    elif comp in self.knots and _is_range(value):
                        knots = [params[f"{comp}.{donor}.{key}.{k}"]
                                 for k in range(self.knots[comp])]
                        values[key] = knots if len(knots) > 1 else knots[0]
                    else:
                        values[key] = params[f"{self._label.get(comp, comp)}.{donor}.{key}"]
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
        params: dict[str, Any] = {"method": recipe.method} if len(self.methods) > 1 else {}
        for name, value in self._searched(recipe.method):
            parts = name.split(".")
            if parts[0] == "parameters":
                got = recipe.parameters.get(parts[1])
            elif self.shared:
                donor, key = parts
                found = {json_key(recipe.components.get(c, {}).get(donor, {}).get(key))
                         for c in self._merged_components() if donor in self.components[c]}
                got = recipe.components.get(self._first_with(donor), {}).get(donor, {}).get(key)
                if len(found) != 1:
                    return None
            else:
                comp, donor, key = parts[:3]
                if "+" in comp:  # a tied group: every member must hold the same value
                    members = [c for c in comp.split("+") if c in self._merged_components()
                               and donor in self.components[c]]
                    found = {json_key(recipe.components.get(c, {}).get(donor, {}).get(key))
                             for c in members}
                    if len(found) != 1:
                        return None
                    comp = members[0]
                got = recipe.components.get(comp, {}).get(donor, {}).get(key)
                if len(parts) == 4 and isinstance(got, list):
                    got = got[int(parts[3])] if len(got) == self.knots[comp] else None
            if got is None:
                return None
            if _is_range(value) and not float(value[0]) <= float(got) <= float(value[1]):
                return None
            if _is_choice(value) and got not in value:
                return None
            params[name] = got
        rebuilt = self.recipe_from_params(params)
        return params if _normalized(rebuilt) == _normalized(recipe) else None

    def _first_with(self, donor: str) -> str:
        return next(c for c in self._merged_components() if donor in self.components[c])

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
        params = self.params_for(candidate)
        if params is None:
            return None
        return params


def _normalized(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a dict with method-level defaults filled (unset == set to the default)."""
    from vlmexp.merge.methods import resolve_params

    data = recipe.to_dict()
    data["parameters"] = resolve_params(recipe.method, recipe.parameters)
    return data


def json_key(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)
