"""The recipe: the YAML document that fully determines a merged model (README, Recipes).

A recipe names a method, a base and donors (each pinned by its weights digest and, for a hub id,
the commit it resolved to), method-level parameters, and per-component, per-donor parameters,
where a list is a schedule over depth (evenly spaced knots, linearly interpolated, as mergekit's
gradients). A component the recipe leaves out keeps the base's weights; `take` copies a
component verbatim from one donor.

Example:
    >>> r = Recipe.from_dict({
    ...     "vlmexp_recipe": 1, "method": "task_arithmetic",
    ...     "base": {"path": "zoo/base"},
    ...     "donors": [{"name": "vqa", "path": "zoo/vqa-expert"}],
    ...     "components": {"language": {"vqa": {"weight": [0.2, 0.8]}}},
    ... })
    >>> r.resolve("language", "vqa", depth=0.5)["weight"]
    0.5
    >>> Recipe.from_yaml_text(r.to_yaml()).content_hash() == r.content_hash()
    True
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmexp.errors import RecipeError
from vlmexp.layout import COMPONENTS, VOCAB_POLICIES

FORMAT_VERSION = 1
DTYPES = ("float32", "float64", "bfloat16", "float16")
MAPS = ("auto", "same", "llm_to_vlm")
_TOP_KEYS = {"vlmexp_recipe", "method", "base", "donors", "parameters", "components", "take",
             "dtype", "seed", "vocab"}
_MODEL_KEYS = {"name", "path", "revision", "weights_sha256", "map"}

Value = float | int | bool | str | list[float]


@dataclass(frozen=True)
class ModelRef:
    """A model a recipe reads: its folder or hub id, the commit a hub id resolved to, and the
    digest of its weights."""

    name: str
    path: str  # a folder, `org/name` or `org/name@revision`
    weights_sha256: str | None = None
    map: str = "auto"  # how a donor's names meet the base's: auto-detected, same, llm_to_vlm
    # the commit a hub id resolved to (`vlmexp.checkpoint.resolve_model`); None for a folder.
    # It wins over a branch in `path`: the recipe opens the same snapshot when `main` moves on.
    revision: str | None = None

    def to_dict(self, *, with_name: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name} if with_name else {}
        out["path"] = self.path
        if self.revision:
            out["revision"] = self.revision
        if self.weights_sha256:
            out["weights_sha256"] = self.weights_sha256
        if self.map != "auto":
            out["map"] = self.map
        return out


@dataclass
class Recipe:
    """A validated merge recipe. Build it with `from_dict` / `from_yaml`, never field by field."""

    method: str
    base: ModelRef
    donors: list[ModelRef]
    parameters: dict[str, Any] = field(default_factory=dict)
    components: dict[str, dict[str, dict[str, Value]]] = field(default_factory=dict)
    take: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    seed: int = 0
    vocab: str = "error"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe") -> Recipe:
        """Parse and validate a recipe mapping; `source` names it in errors (a file path)."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise RecipeError(f"{source}: unknown key {sorted(unknown)[0]!r} "
                              f"(allowed: {', '.join(sorted(_TOP_KEYS))})")
        version = data.get("vlmexp_recipe", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise RecipeError(f"{source}: vlmexp_recipe: {version!r} is not a known format "
                              f"version (this vlmexp reads {FORMAT_VERSION})")
        if "method" not in data:
            raise RecipeError(f"{source}: missing key 'method'")
        if "base" not in data:
            raise RecipeError(f"{source}: missing key 'base'")
        base = _model_ref(data["base"], f"{source}: base", default_name="base")
        donors_raw = data.get("donors") or []
        if not isinstance(donors_raw, list):
            raise RecipeError(f"{source}: donors must be a list of {{name, path}} mappings")
        donors = [_model_ref(d, f"{source}: donors[{i}]") for i, d in enumerate(donors_raw)]
        recipe = cls(
            method=str(data["method"]),
            base=base,
            donors=donors,
            parameters=dict(data.get("parameters") or {}),
            components={str(c): {str(d): dict(p or {}) for d, p in (v or {}).items()}
                        for c, v in (data.get("components") or {}).items()},
            take={str(c): str(d) for c, d in (data.get("take") or {}).items()},
            dtype=str(data.get("dtype", "float32")),
            seed=data.get("seed", 0),
            vocab=str(data.get("vocab", "error")),
        )
        recipe.validate(source)
        return recipe

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str = "recipe") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise RecipeError(f"{source}: not valid YAML{where}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        """Read and validate a recipe file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise RecipeError(f"{path}: cannot read recipe ({err.strerror})") from None
        return cls.from_yaml_text(text, source=str(path))

    # ------------------------------------------------------------------ validation
    @property
    def donor_names(self) -> list[str]:
        return [d.name for d in self.donors]

    def donor(self, name: str) -> ModelRef:
        for d in self.donors:
            if d.name == name:
                return d
        raise RecipeError(f"unknown donor {name!r} (donors: {', '.join(self.donor_names)})")

    def validate(self, source: str = "recipe") -> None:
        """Check every name, parameter and range; raise RecipeError naming the first fault."""
        from vlmexp.merge.methods import METHODS

        spec = METHODS.get(self.method)
        if spec is None:
            raise RecipeError(f"{source}: unknown method {self.method!r} "
                              f"(known: {', '.join(METHODS)})")
        names = self.donor_names
        if len(set(names)) != len(names):
            raise RecipeError(f"{source}: donors: duplicate donor name "
                              f"{next(n for n in names if names.count(n) > 1)!r}")
        if "base" in names:
            raise RecipeError(f"{source}: donors: the name 'base' is reserved for the base model")
        if self.dtype not in DTYPES:
            raise RecipeError(f"{source}: dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.vocab not in VOCAB_POLICIES:
            raise RecipeError(f"{source}: vocab: {self.vocab!r} is not one of "
                              f"{', '.join(VOCAB_POLICIES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError(f"{source}: seed: {self.seed!r} is not an integer")
        method_defs = {p.name: p for p in spec.method_params}
        for key, value in self.parameters.items():
            if key not in method_defs:
                raise RecipeError(f"{source}: parameters.{key}: method {self.method!r} does not "
                                  f"take {key!r} (it takes: {_names(spec.method_params)})")
            _check_value(method_defs[key], value, f"{source}: parameters.{key}", schedule=False)
        donor_defs = {p.name: p for p in spec.donor_params}
        for comp, per_donor in self.components.items():
            if comp not in COMPONENTS:
                raise RecipeError(f"{source}: components.{comp}: unknown component "
                                  f"(known: {', '.join(COMPONENTS)})")
            if comp in self.take:
                raise RecipeError(f"{source}: components.{comp}: the component is also in "
                                  f"'take'; a component is either merged or taken")
            for donor, params in per_donor.items():
                where = f"{source}: components.{comp}.{donor}"
                if donor not in names:
                    raise RecipeError(f"{where}: unknown donor (donors: {', '.join(names)})")
                if not isinstance(params, dict):
                    raise RecipeError(f"{where}: must be a mapping of parameters")
                for key, value in params.items():
                    if key not in donor_defs:
                        raise RecipeError(f"{where}.{key}: method {self.method!r} does not take "
                                          f"{key!r} per donor (it takes: "
                                          f"{_names(spec.donor_params)})")
                    _check_value(donor_defs[key], value, f"{where}.{key}", schedule=True)
                missing = [p.name for p in spec.donor_params
                           if p.default is None and p.name not in params]
                if missing:
                    raise RecipeError(f"{where}: missing required parameter {missing[0]!r}")
            count = len(per_donor)
            if count and count < spec.min_donors:
                raise RecipeError(f"{source}: components.{comp}: method {self.method!r} needs at "
                                  f"least {spec.min_donors} donors, got {count}")
            if spec.max_donors is not None and count > spec.max_donors:
                raise RecipeError(f"{source}: components.{comp}: method {self.method!r} takes at "
                                  f"most {spec.max_donors} donor(s), got {count}")
        for comp, donor in self.take.items():
            if comp not in COMPONENTS:
                raise RecipeError(f"{source}: take.{comp}: unknown component "
                                  f"(known: {', '.join(COMPONENTS)})")
            if donor not in names:
                raise RecipeError(f"{source}: take.{comp}: unknown donor {donor!r} "
                                  f"(donors: {', '.join(names)})")

    # ------------------------------------------------------------------ resolution
    def resolve(self, component: str, donor: str, depth: float) -> dict[str, Any]:
        """The donor's parameters for one tensor of `component` at `depth` (schedules resolved).

        Parameters the recipe leaves unset are absent: the method fills its own defaults.
        """
        params = self.components.get(component, {}).get(donor, {})
        return {k: schedule_value(v, depth) for k, v in params.items()}

    def participants(self, component: str) -> list[str]:
        """Donors merged into `component`, in the recipe's donor order."""
        listed = self.components.get(component, {})
        return [n for n in self.donor_names if n in listed]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "vlmexp_recipe": FORMAT_VERSION,
            "method": self.method,
            "base": self.base.to_dict(with_name=False),
            "donors": [d.to_dict() for d in self.donors],
            "parameters": copy.deepcopy(self.parameters),
            "components": copy.deepcopy(self.components),
            "take": dict(self.take),
            "dtype": self.dtype,
            "seed": self.seed,
        }
        if self.vocab != "error":
            out["vocab"] = self.vocab
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe as YAML (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)
        return path

    def with_revisions(self, revisions: Mapping[str, str | None]) -> Recipe:
        """The recipe with each model's `revision` set from `revisions` ("base" or a donor's
        name → the commit its hub id resolved to); a None or absent entry leaves it as it is.

        Example:
            >>> r = Recipe.from_dict({"method": "linear", "base": "org/base"})
            >>> r.with_revisions({"base": "0" * 40}).base.revision == "0" * 40
            True
        """
        data = self.to_dict()
        for key, ref in [("base", data["base"]), *((d["name"], d) for d in data["donors"])]:
            if revisions.get(key):
                ref["revision"] = revisions[key]
        return Recipe.from_dict(data)

    def content_hash(self) -> str:
        """A stable sha256 of what determines the merge.

        Paths are left out where a weights digest pins the model, so the same recipe run from
        another folder hashes the same; a hub id's revision counts only when the recipe records
        one (so recipes of folders hash as they always did); key order and number spelling
        (1 vs 1.0) do not count.
        """
        data = self.to_dict()
        for ref in [data["base"], *data["donors"]]:
            if ref.get("weights_sha256"):
                ref.pop("path", None)
        canonical = json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def flat_params(self) -> dict[str, str]:
        """The recipe flattened to `a.b.c -> value` strings (for MLflow params)."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for i, v in enumerate(value):
                    walk(f"{prefix}.{v.get('name', i)}", v)
            else:
                flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

        walk("", self.to_dict())
        return flat


def schedule_value(value: Value, depth: float) -> Any:
    """A parameter's value at `depth` in [0, 1]: a list is evenly spaced knots, linearly
    interpolated (mergekit's gradient rule: position depth*(n-1), floor knot, next knot)."""
    if not isinstance(value, list):
        return value
    if len(value) == 1:
        return value[0]
    scaled = depth * (len(value) - 1)
    i0 = min(int(scaled), len(value) - 1)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def _model_ref(raw: Any, where: str, default_name: str | None = None) -> ModelRef:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: must be a mapping with 'path' (and 'name' for donors)")
    unknown = set(raw) - _MODEL_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                          f"(allowed: {', '.join(sorted(_MODEL_KEYS))})")
    name = raw.get("name", default_name)
    if not name:
        raise RecipeError(f"{where}: missing key 'name'")
    if "path" not in raw:
        raise RecipeError(f"{where}: missing key 'path'")
    mapping = str(raw.get("map", "auto"))
    if mapping not in MAPS:
        raise RecipeError(f"{where}.map: {mapping!r} is not one of {', '.join(MAPS)}")
    digest = raw.get("weights_sha256")
    revision = raw.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise RecipeError(f"{where}.revision: {revision!r} is not a revision (a commit hash)")
    return ModelRef(name=str(name), path=str(raw["path"]),
                    weights_sha256=str(digest) if digest else None, map=mapping,
                    revision=revision or None)


def _names(defs: Any) -> str:
    return ", ".join(p.name for p in defs) or "nothing"


def _check_value(pdef: Any, value: Any, where: str, *, schedule: bool) -> None:
    kind = getattr(pdef, "kind", "float")
    if isinstance(value, list):
        if not schedule or kind not in ("float", "int"):
            raise RecipeError(f"{where}: a list (depth schedule) is not allowed here")
        if not value:
            raise RecipeError(f"{where}: an empty schedule")
        for v in value:
            _check_value(pdef, v, where, schedule=False)
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {value!r} is not true/false")
        return
    if kind == "str":
        choices = getattr(pdef, "choices", None)
        if not isinstance(value, str) or (choices and value not in choices):
            allowed = f" (one of {', '.join(choices)})" if choices else ""
            raise RecipeError(f"{where}: {value!r} is not a valid value{allowed}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}: {value!r} is not a number")
    if kind == "int" and not float(value).is_integer():
        raise RecipeError(f"{where}: {value!r} is not an integer")
    if not math.isfinite(value):
        raise RecipeError(f"{where}: {value!r} is not finite")
    low, high = getattr(pdef, "low", None), getattr(pdef, "high", None)
    if low is not None and value < low or high is not None and value > high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise RecipeError(f"{where}: {value!r} is out of range [{lo}, {hi}]")


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
