"""`vlmexp merge` and `vlmexp export`: checkpoints that transformers loads, mergekit agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlmexp.cli import main
from vlmexp.merge.engine import MergeEngine
from vlmexp.merge.recipe import Recipe
from vlmexp.zoo.tiny import build, perturb


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """base, d1, d2 (tiny LLaVA) in native layout, d1 again in transformers' default layout,
    and a Llama text donor: all saved with `save_pretrained`."""
    root = tmp_path_factory.mktemp("merge_cli")
    out = {}
    for name, seed, scale in [("base", 0, 0.0), ("d1", 1, 0.02), ("d2", 2, 0.05)]:
        model = perturb(build("llava", seed=0), seed, scale)
        out[name] = root / name
        model.save_pretrained(out[name], save_original_format=False)
        if name == "d1":
            out["d1_legacy"] = root / "d1_legacy"
            model.save_pretrained(out["d1_legacy"])
    llm = build("llama", seed=0)
    llm.save_pretrained(root / "text")
    out["text"] = root / "text"
    return out


def write_recipe(path: Path, folders, method, components, donors=("d1", "d2"), **extra) -> Path:
    data = {"vlmexp_recipe": 1, "method": method, "base": {"path": str(folders["base"])},
            "donors": [{"name": d, "path": str(folders[d])} for d in donors],
            "components": components, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


CASES = {
    "ties": dict(method="ties", components={
        "vision": {"d1": {"weight": 0.7, "density": 0.5}},
        "projector": {"d1": {"weight": 1.0, "density": 0.6}, "d2": {"weight": 0.3, "density": 0.9}},
        "language": {"d1": {"weight": [0.1, 0.9], "density": 0.5},
                     "d2": {"weight": 0.5, "density": [0.3, 0.8]}}},
        take={"head": "d2"}),
    "task_arithmetic": dict(method="task_arithmetic", components={
        "language": {"d1": {"weight": [1.0, 0.2]}, "d2": {"weight": 0.4}},
        "embed": {"d2": {"weight": 0.5}}}, parameters={"lambda": 0.8}),
    "linear": dict(method="linear", components={
        "vision": {"d1": {"weight": 0.6}, "d2": {"weight": 0.2}},
        "language": {"d2": {"weight": [0.3, 0.9]}}}, parameters={"base_weight": 0.5}),
    "breadcrumbs": dict(method="breadcrumbs", components={
        "language": {"d1": {"weight": 1.0, "density": 0.8, "gamma": 0.05},
                     "d2": {"weight": 0.5, "density": 0.9, "gamma": 0.1}}}),
    "slerp": dict(method="slerp", donors=("d1",), components={
        "vision": {"d1": {"t": 0.3}}, "language": {"d1": {"t": [0.2, 0.8]}}}, take={"head": "d1"}),
    "model_stock": dict(method="model_stock", components={
        c: {"d1": {}, "d2": {}} for c in ("vision", "projector", "language", "embed", "head")}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_runs_in_mergekit_to_the_same_tensors(tmp_path, folders, case):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    spec = dict(CASES[case])
    recipe_path = write_recipe(tmp_path / "r.yaml", folders, spec.pop("method"),
                               spec.pop("components"), donors=spec.pop("donors", ("d1", "d2")),
                               **spec)
    assert main(["export", str(recipe_path), "--out", str(tmp_path / "mk.yaml")]) == 0
    config = yaml.safe_load((tmp_path / "mk.yaml").read_text())
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk_out"),
              MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=False, quiet=True))
    theirs = {}
    for f in (tmp_path / "mk_out").glob("*.safetensors"):
        theirs.update(load_file(f))
    recipe = Recipe.from_yaml(recipe_path)
    engine = MergeEngine.from_recipe(recipe, progress=False)
    engine.apply(recipe)
    ours = engine.state_dict_view()
    assert set(theirs) == set(ours)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= 1e-6, f"{case}: max abs difference {worst}"
    base = load_file(folders["base"] / "model.safetensors")
    assert any(not torch.equal(ours[k], base[k]) for k in ours)  # it merged something


def test_merge_writes_a_loadable_checkpoint_equal_to_the_engine(tmp_path, folders, capsys):
    from transformers import AutoModelForImageTextToText

    spec = CASES["ties"]
    recipe_path = write_recipe(tmp_path / "r.yaml", folders, spec["method"], spec["components"],
                               take=spec["take"])
    out = tmp_path / "merged"
    assert main(["merge", str(recipe_path), "--out", str(out)]) == 0
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    recipe = Recipe.from_yaml(recipe_path)
    engine = MergeEngine.from_recipe(recipe, progress=False)
    engine.apply(recipe)
    ours = engine.state_dict_view()
    theirs = dict(loaded.named_parameters())
    assert set(ours) <= set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the written recipe pins every input by digest
    written = Recipe.from_yaml(out / "recipe.yaml")
    assert written.base.weights_sha256 and all(d.weights_sha256 for d in written.donors)
    # an existing folder is refused (exit 2, one line) unless --force
    capsys.readouterr()
    assert main(["merge", str(recipe_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already exists" in err and str(out) in err
    assert main(["merge", str(recipe_path), "--out", str(out), "--force"]) == 0


def test_default_and_native_layouts_merge_identically(tmp_path, folders):
    comps = {"language": {"d1": {"weight": 0.7}}, "vision": {"d1": {"weight": 0.4}}}
    digests = []
    for donor in ("d1", "d1_legacy"):
        data = {"method": "task_arithmetic", "base": {"path": str(folders["base"])},
                "donors": [{"name": "d1", "path": str(folders[donor])}], "components": comps}
        recipe = Recipe.from_dict(data)
        engine = MergeEngine.from_recipe(recipe, progress=False)
        digests.append(engine.apply(recipe).weights_digest)
    assert digests[0] == digests[1]


def test_export_refuses_what_mergekit_cannot_express(tmp_path, folders, capsys):
    r = write_recipe(tmp_path / "r.yaml", folders, "task_arithmetic",
                     {"language": {"text": {"weight": 0.5}}}, donors=("text",))
    assert main(["export", str(r)]) == 2
    assert "llm_to_vlm donor" in capsys.readouterr().err
    r = write_recipe(tmp_path / "r2.yaml", folders, "model_stock",
                     {"language": {"d1": {}, "d2": {}}})
    assert main(["export", str(r)]) == 2
    assert "cannot leave component 'vision' out" in capsys.readouterr().err
    # a donor saved in transformers' default layout: mergekit would drop its language model
    r = write_recipe(tmp_path / "r3.yaml", folders, "task_arithmetic",
                     {"language": {"d1_legacy": {"weight": 0.5}}}, donors=("d1_legacy",))
    out = tmp_path / "mk.yaml"
    assert main(["export", str(r), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "donor 'd1_legacy'" in err and "legacy names (e.g. 'language_model." in err
    assert "save_original_format=False" in err
    assert not out.exists()


def test_merge_refuses_a_bad_recipe_without_writing(tmp_path, folders, capsys):
    r = tmp_path / "bad.yaml"
    r.write_text(json.dumps({"method": "ties", "base": {"path": str(folders["base"])},
                             "donors": [{"name": "d1", "path": str(folders["d1"])}],
                             "components": {"language": {"d1": {"weight": 1, "density": 2}}}}))
    out = tmp_path / "never"
    assert main(["merge", str(r), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "components.language.d1.density: 2 is out of range [0, 1]" in err
    assert not out.exists()
