"""The unsupervised objective (`eval.objective: unsupervised`), the full-set estimate with its
standard error (`Evaluator.estimate`) and the subset screen that reads it (`pruner: subset`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from vlmexp.config import compose
from vlmexp.errors import ConfigError, EvalError
from vlmexp.eval.evaluator import EvalResult, Evaluator, ItemScore, eval_config, item_confidence
from vlmexp.search.pruning import Pruning

EXAMPLES = Path(__file__).resolve().parents[1] / "evals" / "examples"
OBJECTIVES = {"vl": {"example_shapes_jsonl": 1.0}, "text": {"example_next_item": 1.0},
              "combined": {"example_shapes_jsonl": 3.0, "example_next_item": 1.0}}


def _copy_tasks(dest: Path, *, scramble: bool) -> Path:
    """The example image and lm-eval tasks, with every answer moved to another choice."""
    dest.mkdir()
    for name in ("shapes_jsonl.yaml", "next_item_lmeval.yaml"):
        shutil.copy(EXAMPLES / name, dest / name)
    (dest / "images").symlink_to(EXAMPLES / "images")
    shutil.copytree(EXAMPLES / "lm_eval", dest / "lm_eval")
    if scramble:
        rows = [json.loads(line) for line in (EXAMPLES / "shapes.jsonl").read_text().splitlines()]
        for row in rows:
            row["answer"] = row["choices"][(row["choices"].index(row["answer"]) + 1) % 4]
        (dest / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        path = dest / "lm_eval" / "next_item.jsonl"
        docs = [json.loads(line) for line in path.read_text().splitlines()]
        for doc in docs:
            doc["label"] = (doc["label"] + 1) % len(doc["choices"])
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    else:
        shutil.copy(EXAMPLES / "shapes.jsonl", dest / "shapes.jsonl")
    return dest


def _evaluator(folder: Path, processor, objective: str) -> Evaluator:
    cfg = {"tasks": ["shapes_jsonl.yaml", "next_item_lmeval.yaml"], "objectives": OBJECTIVES,
           "batch_size": 3, "objective": objective}
    return Evaluator.from_config(cfg, processor, base_dir=folder)


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny, tiny_processor) -> dict[str, EvalResult]:
    root = tmp_path_factory.mktemp("unsupervised")
    model, processor = tiny("llava"), tiny_processor("llava")
    folders = {"true": _copy_tasks(root / "true", scramble=False),
               "scrambled": _copy_tasks(root / "scrambled", scramble=True)}
    out = {}
    for labels, folder in folders.items():
        for objective in ("labelled", "unsupervised"):
            out[f"{labels} {objective}"] = _evaluator(folder, processor, objective).evaluate(model)
    return out


def test_confidence_is_one_minus_normalized_entropy():
    p = [0.7, 0.2, 0.1]
    entropy = -sum(x * math.log(x) for x in p)
    expected = 1 - entropy / math.log(3)  # 0.272...
    assert item_confidence([math.log(x) for x in p]) == pytest.approx(expected, abs=1e-12)
    # log-likelihoods need not be normalized: a shift changes nothing
    assert item_confidence([math.log(x) - 7.5 for x in p]) == pytest.approx(expected, abs=1e-12)
    assert item_confidence([-1.0, -1.0]) == pytest.approx(0.0, abs=1e-12)
    assert item_confidence([0.0, -1000.0, -1000.0]) == pytest.approx(1.0, abs=1e-12)


def test_scrambled_labels_leave_the_unsupervised_objective_unchanged(results):
    true, scrambled = results["true unsupervised"], results["scrambled unsupervised"]
    assert scrambled.objectives == true.objectives  # exactly: no label is read
    # the labels really were scrambled: every item that was right is now wrong
    for task in ("example_shapes_jsonl", "example_next_item"):
        right = [s.correct for s in results["true labelled"].items[task]]
        assert not any(s.correct and r for s, r in
                       zip(results["scrambled labelled"].items[task], right, strict=True))
    assert results["scrambled labelled"].objectives != results["true labelled"].objectives


def test_unsupervised_objective_is_the_mean_confidence_by_hand(results):
    result = results["true unsupervised"]
    by_task = {}
    for task, items in result.items.items():
        per_item = []
        for item in items:  # softmax and entropy over the item's choices, in torch
            p = torch.tensor(item.scores, dtype=torch.float64).softmax(0)
            per_item.append(1 - float(-(p * p.log()).sum()) / math.log(len(item.scores)))
        by_task[task] = sum(per_item) / len(per_item)
        assert result.metrics[task]["confidence"] == pytest.approx(by_task[task], abs=1e-9)
    assert result.objectives["vl"] == pytest.approx(by_task["example_shapes_jsonl"], abs=1e-9)
    assert result.objectives["combined"] == pytest.approx(
        (3 * by_task["example_shapes_jsonl"] + by_task["example_next_item"]) / 4, abs=1e-9)
    # the labelled run scores the same items' accuracies, and no confidence
    labelled = results["true labelled"]
    assert "confidence" not in labelled.metrics["example_shapes_jsonl"]
    assert labelled.objectives["vl"] == labelled.metrics["example_shapes_jsonl"]["acc"]


def test_estimate_is_exact_on_the_whole_set_and_widens_on_a_subset():
    # an evaluator only for its objective weights and subset sizes
    ev = Evaluator.__new__(Evaluator)
    ev.objective, ev.objectives = "labelled", {"vl": {"t": 1.0}}
    ev._subsets = {"t": list(range(8))}

    def part(values):
        items = [ItemScore("t", i, "a", "a", bool(v), 0.0, [0.0, 0.0], value=float(v))
                 for i, v in enumerate(values)]
        return EvalResult(metrics={}, objectives={}, items={"t": items})

    value, se = ev.estimate([part([1, 1, 0, 1, 0, 1, 1, 0])])["vl"]
    assert (value, se) == (pytest.approx(5 / 8), 0.0)  # all N items seen: nothing to estimate
    value, se = ev.estimate([part([1, 1, 0, 1])])["vl"]
    p = (3 + 1) / (4 + 2)  # add-one smoothed mean of the 4 items
    assert value == pytest.approx(0.75)
    assert se == pytest.approx(math.sqrt(p * (1 - p) / 4 * (8 - 4) / (8 - 1)), abs=1e-12)


def test_estimate_of_a_real_evaluation_matches_its_objectives(tiny, tiny_processor):
    ev = _evaluator(EXAMPLES, tiny_processor("llava"), "labelled")
    model = tiny("llava")
    full = ev.evaluate(model)
    estimate = ev.estimate([full])
    for objective, value in full.objectives.items():
        assert estimate[objective] == (pytest.approx(value), 0.0)
    half = ev.evaluate(model, fractions=(0.0, 0.5))
    values, _ = ev.joined([half])
    for objective, (value, se) in ev.estimate([half]).items():
        assert value == pytest.approx(values[objective]) and se > 0


def test_subset_pruner_stops_only_below_the_best_by_z_standard_errors():
    pruning = Pruning(objectives=["combined"], pruner="subset", rungs=[0.25], startup_trials=0,
                      z=2.0, estimate=lambda parts: {"combined": parts[0]})

    class Trial:
        def report(self, value, step):
            pass

    pruning.history.best_value = 0.70
    assert pruning.decide(Trial(), 0, 40, {"combined": 0.55}, [(0.55, 0.05)]) is not None
    assert pruning.decide(Trial(), 0, 40, {"combined": 0.61}, [(0.61, 0.05)]) is None
    # minimised objectives: below is better
    low = Pruning(objectives=["ppl"], directions=["minimize"], pruner="subset", rungs=[0.25],
                  startup_trials=0, z=1.0, estimate=lambda parts: {"ppl": parts[0]})
    low.history.best_value = 10.0
    assert low.decide(Trial(), 0, 40, {"ppl": 12.0}, [(12.0, 1.0)]) is not None
    assert low.decide(Trial(), 0, 40, {"ppl": 10.5}, [(10.5, 1.0)]) is None


def test_config_objective_choices_and_the_held_out_report():
    assert compose(["eval=unsupervised"]).eval.objective == "unsupervised"
    with pytest.raises(ConfigError, match="eval.objective: 'unlabeled' is not one of"):
        compose(["eval.objective=unlabeled"])
    with pytest.raises(ConfigError, match="paired compares items' scores against the answers"):
        compose(["eval=unsupervised", "search.pruning.pruner=paired"])
    node = {"tasks": ["a.yaml"], "test_tasks": ["b.yaml"], "objective": "unsupervised"}
    assert eval_config(node, device="cpu")["objective"] == "unsupervised"
    assert eval_config(node, device="cpu", test=True)["objective"] == "labelled"


def test_unknown_objective_kind_is_refused(tiny_processor):
    with pytest.raises(EvalError, match="objective 'guess' is not one of"):
        Evaluator([], {}, tiny_processor("llava"), objective="guess")


@pytest.fixture(scope="module")
def models(study_models) -> dict[str, Path]:
    """conftest's tiny LLaVA base, perturbed relative and Llama from its language model."""
    return study_models


@pytest.mark.slow
def test_an_unsupervised_study_screened_on_subsets(tmp_path, models, monkeypatch):
    """A study on the unsupervised objective with the subset screen: every complete trial's
    value is its tasks' mean confidence, and the screen stops a trial only with its reason."""
    import mlflow
    from omegaconf import OmegaConf

    from vlmexp.config import validate
    from vlmexp.search.study import run_search

    monkeypatch.chdir(tmp_path)
    tasks = f"[{EXAMPLES / 'shapes_jsonl.yaml'},{EXAMPLES / 'next_item_lmeval.yaml'}]"
    raw = OmegaConf.to_container(compose([
        f"models.base={models['base']}", f"models.donors.vqa.path={models['vqa']}",
        f"models.donors.text.path={models['text']}", "eval=unsupervised",
        f"eval.tasks={tasks}", "eval.test_tasks=[]",
        f"search.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "study_name=tiny",
        "search.sampler=random", "search.n_trials=8", "search.pruning.pruner=subset",
        "search.pruning.rungs=[0.5]", "search.pruning.startup_trials=4",
        "search.pruning.z=0.0"]))
    raw["eval"]["objectives"] = {"combined": {"example_shapes_jsonl": 1.0,
                                              "example_next_item": 1.0}}
    result = run_search(validate(raw), progress=False)
    assert result.trials == 8
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get("vlmexp.role") == "trial"]
    complete = [r for r in runs if r.data.tags["vlmexp.state"] == "COMPLETE"]
    assert len(complete) >= 4
    for r in complete:
        m = r.data.metrics
        assert m["objective.combined"] == pytest.approx(
            (m["example_shapes_jsonl.confidence"] + m["example_next_item.confidence"]) / 2)
    for r in runs:
        if r.data.tags["vlmexp.state"] == "PRUNED":
            assert "standard errors worse than the best" in r.data.tags["vlmexp.reason"]
