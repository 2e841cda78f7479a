"""vlmexp.merge.methods against mergekit 0.1.5 itself, tensor by tensor, on a tiny Llama.

Each configuration runs mergekit once (Python API, CPU, float32) on a base and two donors made by
perturbing the base with seeded noise; the test recomputes every tensor with `merge_tensor`,
resolving list values over depth with mergekit's own gradient rule (`_at`), and compares.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmexp.merge.methods import METHODS, merge_tensor

pytest.importorskip("mergekit")

LAYERS = 3
TOL = 1e-6

# name → (merge_method, models [(model, parameters)], base_model listed?, method parameters).
# Model keys: "base", "d0", "d1". A list value is a gradient over layer index.
CONFIGS: dict[str, dict[str, Any]] = {
    "linear_norm_base": dict(
        method="linear",
        models=[("d0", {"weight": [0.2, 1.0]}), ("d1", {"weight": 0.7}), ("base", {"weight": 0.5})],
        params={},
    ),
    "linear_sum": dict(
        method="linear",
        models=[("d0", {"weight": 0.4}), ("d1", {"weight": [1.0, 0.1, 0.6]})],
        params={"normalize": False},
        base_model=False,
    ),
    "task_arithmetic": dict(
        method="task_arithmetic",
        models=[("d0", {"weight": 0.7}), ("d1", {"weight": [1.0, 0.2, 0.5]})],
        params={"lambda": 0.8},
    ),
    "task_arithmetic_norm": dict(
        method="task_arithmetic",
        models=[("d0", {"weight": 0.3}), ("d1", {"weight": 0.9})],
        params={"normalize": True},
    ),
    "ties": dict(
        method="ties",
        models=[("d0", {"weight": 1.0, "density": [0.3, 0.9]}), ("d1", {"weight": 0.6, "density": 0.5})],
        params={},
    ),
    "ties_sum_lambda": dict(
        method="ties",
        models=[("d0", {"weight": [0.5, 1.5], "density": 0.7}), ("d1", {"weight": 0.8, "density": 0.7})],
        params={"normalize": False, "lambda": 1.3},
    ),
    "ties_rescale": dict(
        method="ties",
        models=[("d0", {"weight": 1.0, "density": 0.4}), ("d1", {"weight": 1.0, "density": 0.6})],
        params={"rescale": True},
    ),
    "breadcrumbs": dict(
        method="breadcrumbs",
        models=[("d0", {"weight": 1.0, "density": 0.8, "gamma": 0.05}),
                ("d1", {"weight": 0.5, "density": [0.5, 0.9], "gamma": 0.1})],
        params={},
    ),
    "breadcrumbs_ties": dict(
        method="breadcrumbs_ties",
        models=[("d0", {"weight": 1.0, "density": 0.6, "gamma": 0.1}),
                ("d1", {"weight": 0.7, "density": 0.7, "gamma": 0.02})],
        params={"normalize": True},
    ),
    # density 1: no random draw, so the consensus, normalize and lambda parts are checked.
    "dare_ties_dense": dict(
        method="dare_ties",
        models=[("d0", {"weight": 0.9, "density": 1.0}), ("d1", {"weight": 0.4, "density": 1.0})],
        params={"lambda": 1.1},
    ),
    "della_dense": dict(
        method="della",
        models=[("d0", {"weight": 0.9, "density": 1.0}), ("d1", {"weight": 0.4, "density": 1.0})],
        params={},
    ),
    "slerp": dict(method="slerp", models=[("d1", {})], params={"t": 0.3}, donor_keys=("t",)),
    "slerp_gradient": dict(
        method="slerp", models=[("d1", {})], params={"t": [0.0, 0.5, 1.0]}, donor_keys=("t",),
    ),
    "nuslerp": dict(
        method="nuslerp", models=[("d0", {"weight": 0.3}), ("d1", {"weight": 0.7})], params={},
    ),
    "nuslerp_rows": dict(
        method="nuslerp",
        models=[("d0", {"weight": [0.2, 0.8]}), ("d1", {"weight": 0.5})],
        params={"nuslerp_flatten": False},
    ),
    "nuslerp_columns_no_base": dict(
        method="nuslerp",
        models=[("d0", {"weight": 0.6}), ("d1", {"weight": 0.4})],
        params={"nuslerp_flatten": False, "nuslerp_row_wise": True},
        base_model=False,
    ),
    "model_stock": dict(method="model_stock", models=[("d0", {}), ("d1", {})], params={}),
    "model_stock_filter": dict(
        method="model_stock", models=[("d0", {}), ("d1", {})], params={"filter_wise": True},
    ),
    "karcher": dict(method="karcher", models=[("d0", {}), ("d1", {})], params={}),
    # mergekit zeroes small tensors here; vlmexp does not (test_breadcrumbs_small_tensor...)
    "breadcrumbs_low_density": dict(
        method="breadcrumbs", models=[("d0", {"weight": 1.0, "density": 0.05, "gamma": 0.01})],
        params={},
    ),
    "karcher_no_base": dict(
        method="karcher", models=[("d0", {}), ("d1", {})], params={"max_iter": 20},
        base_model=False,
    ),
}

AGREEING = [name for name in CONFIGS if name != "breadcrumbs_low_density"]

# vlmexp parameters that stand for mergekit's way of saying the same thing.
EXTRA_PARAMS: dict[str, dict[str, Any]] = {
    "linear_norm_base": {"base_weight": 0.5},
    "nuslerp_columns_no_base": {"use_base": False},
    "karcher_no_base": {"use_base": False},
}


def _at(value: Any, t: float) -> Any:
    """mergekit's gradient: evenly spaced knots over t ∈ [0, 1], linearly interpolated."""
    if not isinstance(value, list):
        return value
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def _depth(name: str) -> float:
    """mergekit's t for a tensor: layer i of L → i / (L − 1); every other tensor → 0."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) / (LAYERS - 1) if match else 0.0


@pytest.fixture(scope="session")
def mergekit_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama base and two donors (different noise scales, partly opposite signs)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("mergekit_models")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(cfg)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    noise0 = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    noise1 = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    donors = {
        "d0": {k: base[k] + 0.01 * noise0[k] for k in base},
        # Anti-correlated with d0 on half the signal, with a larger own part: sign conflicts.
        "d1": {k: base[k] - 0.005 * noise0[k] + 0.03 * noise1[k] for k in base},
    }
    for key, weights in donors.items():
        model.load_state_dict(weights)
        model.save_pretrained(root / key)
    return {"root": root, "base": base, **donors}


@pytest.fixture(scope="session")
def mergekit_output(
    mergekit_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], dict[str, torch.Tensor]]:
    """`mergekit_output(name)` runs mergekit once for CONFIGS[name] and returns its tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    root: Path = mergekit_models["root"]
    cache: dict[str, dict[str, torch.Tensor]] = {}
    options = MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=False, quiet=True)

    def run(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            conf = CONFIGS[name]
            document: dict[str, Any] = {
                "merge_method": conf["method"],
                "dtype": "float32",
                "models": [
                    {"model": str(root / key), **({"parameters": p} if p else {})}
                    for key, p in conf["models"]
                ],
            }
            if conf.get("base_model", True):
                document["base_model"] = str(root / "base")
            if conf["params"]:
                document["parameters"] = conf["params"]
            out = tmp_path_factory.mktemp(f"mergekit_{name}")
            run_merge(MergeConfiguration.model_validate(document), str(out), options)
            cache[name] = load_file(str(out / "model.safetensors"))
        return cache[name]

    return run


def _ours(name: str, models: dict[str, Any], tensor: str) -> torch.Tensor:
    conf = CONFIGS[name]
    spec = METHODS[conf["method"]]
    t = _depth(tensor)
    base = models["base"][tensor]
    donor_keys = [key for key, _ in conf["models"] if key != "base"]
    donor_only = set(conf.get("donor_keys", ()))
    donor_params = [
        {k: _at(v, t) for k, v in dict(p).items()}
        for key, p in conf["models"]
        if key != "base"
    ]
    for p in donor_params:
        p.update({k: _at(conf["params"][k], t) for k in donor_only})
    params = {k: _at(v, t) for k, v in conf["params"].items() if k not in donor_only}
    params.update(EXTRA_PARAMS.get(name, {}))
    params.pop("weight", None)
    weights = [models[key][tensor] for key in donor_keys]
    donors = weights if spec.inputs == "weights" else [w - base for w in weights]
    return merge_tensor(spec.name, base, donors, donor_params, params)


@pytest.mark.parametrize("name", AGREEING)
def test_matches_mergekit(
    name: str, mergekit_models: dict[str, Any], mergekit_output: Callable
) -> None:
    theirs = mergekit_output(name)
    assert set(theirs) == set(mergekit_models["base"])
    errors = {
        tensor: (_ours(name, mergekit_models, tensor) - theirs[tensor]).abs().max().item()
        for tensor in theirs
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{name}: {worst} differs by {errors[worst]:.2e}"
    # the merge must actually move the weights (a no-op would pass trivially for some tensors)
    assert any(
        not torch.equal(theirs[tensor], mergekit_models["base"][tensor]) for tensor in theirs
    )


def test_breadcrumbs_small_tensor_kept_intact(
    mergekit_models: dict[str, Any], mergekit_output: Callable
) -> None:
    """Where int(density·n) == 0 mergekit zeroes the delta; vlmexp keeps it (documented)."""
    name = "breadcrumbs_low_density"
    theirs = mergekit_output(name)
    norm = "model.norm.weight"  # 16 entries: int(0.05 · 16) == 0
    base, donor = mergekit_models["base"][norm], mergekit_models["d0"][norm]
    assert torch.equal(theirs[norm], base)
    ours = _ours(name, mergekit_models, norm)
    assert (ours - donor).abs().max().item() <= TOL
    big = "model.layers.0.mlp.up_proj.weight"  # 512 entries: both keep 25
    assert (_ours(name, mergekit_models, big) - theirs[big]).abs().max().item() <= TOL
    assert ((theirs[big] - mergekit_models["base"][big]) != 0).sum().item() == 25


def test_parameters_and_defaults_match_mergekit() -> None:
    """Every mergekit parameter has a vlmexp twin with the same default (required ↔ None)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import MISSING

    for spec in METHODS.values():
        assert spec.mergekit is not None
        theirs = {p.name: p.default for p in registry.get(spec.mergekit).spec.parameters}
        ours = {p.name: p.default for p in spec.donor_params + spec.method_params}
        assert set(theirs) <= set(ours), (spec.name, set(theirs) - set(ours))
        for name, default in theirs.items():
            assert ours[name] == (None if default is MISSING else default), (spec.name, name)
