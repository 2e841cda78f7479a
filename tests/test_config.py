"""Hydra composition into the structured schema: defaults, overrides, one-line errors."""

from __future__ import annotations

import pytest

from vlmexp.cli import main
from vlmexp.config import compose
from vlmexp.errors import ConfigError


def test_default_composition_is_the_demo_study():
    cfg = compose()
    assert cfg.study_name == "demo"
    assert cfg.models.base == "zoo:base"
    assert set(cfg.models.donors) == {"vqa", "text"}
    assert cfg.models.donors.text.map == "llm_to_vlm"
    assert (cfg.models.trust_remote_code, cfg.models.allow_pickle) == (False, False)
    assert cfg.merge.method == "task_arithmetic"
    assert cfg.search.objectives == ["combined"]
    assert set(cfg.eval.objectives) == {"vl", "text", "combined"}


def test_overrides_and_group_choices():
    # a group choice is applied before key overrides, whatever their order
    cfg = compose(["search.n_trials=7", "merge=ties", "search=pareto", "space=global"])
    assert cfg.search.n_trials == 7
    assert cfg.merge.method == "ties" and cfg.merge.parameters.normalize is True
    assert cfg.search.objectives == ["vl", "text"] and cfg.search.sampler == "nsga2"
    assert cfg.space.shared is True


@pytest.mark.parametrize(("overrides", "message"), [
    (["serch.n_trials=3"], "serch.n_trials: no such key in the config"),
    (["search.n_trials=abc"], "search.n_trials: Value 'abc'"),
    (["+search.colour=1"], "search.colour: Key 'colour' not in"),
    (["search.sampler=bayes"], "search.sampler: 'bayes' is not one of"),
    (["search.objectives=[accuracy]"], "search.objectives: 'accuracy' is not an objective"),
    (["search.pruning.rungs=[1.5]"], "search.pruning.rungs: 1.5 is not a fraction"),
    (["merge=average"], "merge"),
])
def test_bad_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_prints_the_config_and_exits_2_on_a_typo(capsys):
    assert main(["search", "--cfg", "search.n_trials=3"]) == 0
    out = capsys.readouterr().out
    assert "n_trials: 3" in out and "method: task_arithmetic" in out
    assert main(["search", "--cfg", "serch.n_trials=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmexp search: error: ") and "\n" not in err


@pytest.mark.parametrize("override, message", [
    ("search.n_trial=5", "search.n_trial: no such key in the config (a typo?)"),
    ("space=globl", "space=globl: no such config in conf/space/"),
    ("device=gpu", "device: 'gpu' is not auto, cpu, cuda or cuda:N"),
    ("merge.dtype=float8", "merge.dtype: 'float8' is not one of float32, float64"),
    ("merge.method=tie", "merge.method: 'tie' is not one of linear, task_arithmetic"),
    ("models.donors.text.map=llm2vlm", "models.donors.text.map: 'llm2vlm' is not one of auto"),
])
def test_a_bad_setting_is_one_line_naming_it(override, message):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_paired_pruner_needs_one_objective():
    with pytest.raises(ConfigError, match="search.pruning.pruner: paired compares one objective"):
        compose(["search=pareto", "search.pruning.pruner=paired"])
