"""SearchSpace: trial -> recipe -> trial parameters, knots, shared weights, baselines, errors."""

from __future__ import annotations

import optuna
import pytest

from vlmexp.errors import ConfigError
from vlmexp.merge.recipe import ModelRef
from vlmexp.search.space import SearchSpace

BASE = ModelRef("base", "models/base")
DONORS = [ModelRef("vqa", "models/vqa"), ModelRef("text", "models/text", map="llm_to_vlm")]


def space(**over) -> SearchSpace:
    cfg = {"components": {"vision": {"vqa": {"weight": [0.0, 1.5]}},
                          "language": {"vqa": {"weight": [0.0, 1.0]},
                                       "text": {"weight": [0.0, 1.5], "density": 0.8}}},
           "parameters": {}, "knots": {}, "methods": [], "pin": [], "take": {}}
    cfg.update(over)
    merge = {"method": "task_arithmetic", "parameters": {"lambda": 1.0}, "seed": 3}
    return SearchSpace(cfg, merge, BASE, DONORS)


def test_trial_to_recipe_and_back():
    sp = space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    recipe = sp.suggest(trial)
    assert set(trial.params) == {"vision.vqa.weight", "language.vqa.weight", "language.text.weight"}
    assert recipe.components["language"]["text"] == {
        "weight": trial.params["language.text.weight"], "density": 0.8}
    assert recipe.parameters == {"lambda": 1.0} and recipe.seed == 3
    assert sp.params_for(recipe) == trial.params
    # enqueueing those parameters rebuilds the identical recipe
    study.enqueue_trial(sp.params_for(recipe))
    again = sp.suggest(study.ask())
    assert again.content_hash() == recipe.content_hash()


def test_knots_make_a_depth_schedule():
    sp = space(knots={"language": 3})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    recipe = sp.suggest(trial)
    knots = [trial.params[f"language.vqa.weight.{k}"] for k in range(3)]
    assert recipe.components["language"]["vqa"]["weight"] == knots
    assert recipe.resolve("language", "vqa", 0.25)["weight"] == pytest.approx(
        (knots[0] + knots[1]) / 2)
    assert sp.params_for(recipe) == trial.params


def test_shared_weights_are_one_per_donor():
    sp = space(shared=True)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2)).ask()
    recipe = sp.suggest(trial)
    assert set(trial.params) == {"vqa.weight", "text.weight"}
    assert (recipe.components["vision"]["vqa"]["weight"]
            == recipe.components["language"]["vqa"]["weight"] == trial.params["vqa.weight"])


def test_tied_components_share_one_value_per_donor():
    comps = {"vision": {"vqa": {"weight": [0.0, 1.5]}},
             "language": {"vqa": {"weight": [0.0, 1.0]}, "text": {"weight": [0.0, 1.5]}},
             "head": {"vqa": {"weight": [0.0, 1.0]}, "text": {"weight": [0.0, 1.5]}}}
    sp = space(components=comps, tie=[["language", "head"]])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    trial = study.ask()
    recipe = sp.suggest(trial)
    assert set(trial.params) == {"vision.vqa.weight", "language+head.vqa.weight",
                                 "language+head.text.weight"}
    for donor in ("vqa", "text"):
        assert (recipe.components["language"][donor]["weight"]
                == recipe.components["head"][donor]["weight"]
                == trial.params[f"language+head.{donor}.weight"])
    assert sp.params_for(recipe) == trial.params
    # a recipe whose tied components differ is outside the space
    data = recipe.to_dict()
    data["components"]["head"]["vqa"]["weight"] = 0.123456
    from vlmexp.merge.recipe import Recipe

    assert sp.params_for(Recipe.from_dict(data)) is None


@pytest.mark.parametrize("tie, message", [
    ([["language"]], "needs 2 or more"),
    ([["language", "embed"]], "'embed' is not in space.components"),
    ([["language", "head"], ["head", "vision"]], "'head' is in two groups"),
    ([["language", "vision"]], r"vqa\.weight differs between its components"),
])
def test_bad_tie_is_one_line_error(tie, message):
    comps = {"vision": {"vqa": {"weight": [0.0, 1.5]}},
             "language": {"vqa": {"weight": [0.0, 1.0]}},
             "head": {"vqa": {"weight": [0.0, 1.0]}}}
    with pytest.raises(ConfigError, match=message):
        space(components=comps, tie=tie)


def test_method_choice_and_pins():
    sp = space(methods=["task_arithmetic", "ties"], pin=["vision"],
               parameters={"lambda": [0.5, 1.5]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    methods = set()
    for _ in range(8):
        trial = study.ask()
        recipe = sp.suggest(trial)
        methods.add(recipe.method)
        assert "vision" not in recipe.components
        assert 0.5 <= recipe.parameters["lambda"] <= 1.5
        assert sp.params_for(recipe) == trial.params
    assert methods == {"task_arithmetic", "ties"}


def test_baselines_are_the_base_each_donor_and_the_average():
    sp = space(components={"vision": {"vqa": {"weight": [0.0, 1.5]}},
                           "language": {"vqa": {"weight": [0.0, 1.0]},
                                        "text": {"weight": [0.0, 1.5]}}})
    baselines = dict(sp.baselines())
    assert list(baselines) == ["base", "vqa alone", "text alone", "uniform average"]
    assert baselines["base"].components == {}
    assert baselines["vqa alone"].components == {"vision": {"vqa": {"weight": 1.0}},
                                                 "language": {"vqa": {"weight": 1.0}}}
    assert baselines["text alone"].components == {"language": {"text": {"weight": 1.0}}}
    avg = baselines["uniform average"].components
    assert avg["language"]["vqa"]["weight"] == pytest.approx(1 / 3)
    params = sp.baseline_params(baselines["uniform average"])
    assert params == pytest.approx({"vision.vqa.weight": 1 / 3, "language.vqa.weight": 1 / 3,
                                    "language.text.weight": 1 / 3})
    assert sp.baseline_params(baselines["base"]) == {
        "vision.vqa.weight": 0.0, "language.vqa.weight": 0.0, "language.text.weight": 0.0}


def test_a_baseline_outside_the_space_is_not_expressible():
    sp = space(components={"language": {"vqa": {"weight": [0.5, 1.0]}}})
    assert sp.baseline_params(dict(sp.baselines())["base"]) is None


@pytest.mark.parametrize(("over", "message"), [
    ({"components": {"visual": {"vqa": {"weight": [0, 1]}}}}, "space.components.visual: unknown component"),
    ({"components": {"vision": {"ocr": {"weight": [0, 1]}}}}, "space.components.vision.ocr: unknown donor"),
    ({"components": {"vision": {"vqa": {"weight": [0, 1], "t": 0.5}}}}, "no method of task_arithmetic takes 't'"),
    ({"components": {"language": {"vqa": {"weight": [0, 1], "density": [0.5, 1.5]}}}},
     "density: 1.5 is out of range [0, 1]"),
    ({"knots": {"head": 2}}, "space.knots.head: the component is not in space.components"),
])
def test_bad_spaces_are_one_line_config_errors(over, message):
    with pytest.raises(ConfigError) as err:
        space(**over)
    assert message in str(err.value) and "\n" not in str(err.value)
