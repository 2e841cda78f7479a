"""Reading runs back: find_run by id and as the best run, load_study_config, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from vlmexp.errors import TrackingError
from vlmexp.merge.fingerprint import Fingerprint
from vlmexp.merge.recipe import Recipe
from vlmexp.search.mlflow_store import BEST_RUN, PARETO_RUNS
from vlmexp.search.runs import find_run, load_study_config
from vlmexp.search.tracking import Tracker, TrialRecord

CONFIG = {"study_name": "s", "search": {"n_trials": 3, "objectives": ["acc"]},
          "eval": {"tasks": ["evals/demo/a.yaml"], "objectives": {"acc": {"a": 1.0}}}}


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds); tests use their
    own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('runs') / 'mlflow.db'}"


def make_recipe(weight: float) -> Recipe:
    return Recipe.from_dict({
        "method": "task_arithmetic", "base": {"path": "zoo/base"},
        "donors": [{"name": "vqa", "path": "zoo/vqa"}],
        "components": {"language": {"vqa": {"weight": weight}}},
    })


def log(tracker: Tracker, number: int, value: float | None, state: str = "COMPLETE",
        objectives: tuple[str, ...] = ("acc",), with_recipe: bool = True) -> str:
    """Log a trial whose objectives (and task metric `demo_a.acc`) all equal `value`."""
    done = state == "COMPLETE"
    return tracker.log_trial(TrialRecord(
        number=number, state=state, recipe=make_recipe(number / 10) if with_recipe else None,
        values={o: value for o in objectives} if done else {},
        metrics={"demo_a.acc": value, "demo_a.margin": 0.1} if done else {},
        intermediate=[(4, {objectives[0]: 0.25})] if done else [],
        seconds={"merge": 0.01}, weights_digest=f"isum2:{number:064x}", items=None))


def study(uri: str, name: str, directions: tuple[str, ...] = ("maximize",),
          objectives: tuple[str, ...] = ("acc",)) -> Tracker:
    tracker = Tracker(tracking_uri=uri, experiment=name, study_name=name)
    tracker.start(CONFIG, objectives=list(objectives), directions=list(directions))
    return tracker


def test_find_run_by_id_reads_recipe_digest_metrics_and_values(uri):
    tracker = study(uri, "by-id")
    a = log(tracker, 3, 0.4)
    tracker.close()
    info = find_run(uri, run_id=a)
    assert info.run_id == a and info.experiment == "by-id" and info.trial == 3
    assert info.state == "COMPLETE" and info.recipe == make_recipe(0.3)
    assert info.weights_digest == f"isum2:{3:064x}"
    assert info.metrics == {"demo_a.acc": 0.4, "demo_a.margin": 0.1}  # no objective./seconds.
    assert info.values == {"acc": 0.4}
    assert info.parent_run_id == tracker.parent_run_id
    assert info.tracking_uri == uri


def test_find_run_reads_the_fingerprints_back_exactly(uri):
    tracker = study(uri, "prints")
    prints = {"language": Fingerprint(total=-0.1 / 3, norm=12345.678901234567, count=10 ** 9),
              "vision": Fingerprint(total=2.0 ** -40, norm=1e-300, count=7)}
    logged = tracker.log_trial(TrialRecord(
        number=0, state="COMPLETE", recipe=make_recipe(0.1), values={"acc": 0.5}, metrics={},
        intermediate=[], seconds={}, weights_digest="isum2:" + "1" * 64, items=None,
        fingerprints=prints))
    bare = log(tracker, 1, 0.4)
    tracker.close()
    assert find_run(uri, run_id=logged).fingerprints == prints  # every digit round-trips
    assert find_run(uri, run_id=bare).fingerprints == {}
    client = MlflowClient(uri)
    client.set_tag(bare, "vlmexp.fingerprint.head", "1.0,2.0")
    with pytest.raises(TrackingError, match="tag vlmexp.fingerprint.head is '1.0,2.0', not"):
        find_run(uri, run_id=bare)


def test_best_is_the_best_complete_trial_in_the_study_direction(uri):
    tracker = study(uri, "best-max")
    high = log(tracker, 0, 0.4)
    log(tracker, 1, 0.2)
    log(tracker, 2, None, "PRUNED")
    tracker.close()
    # no best_run tag (finish never ran): the COMPLETE trial with the best objective
    assert find_run(uri, best=True, experiment="best-max").run_id == high
    low_tracker = study(uri, "best-min", directions=("minimize",))
    log(low_tracker, 0, 0.4)
    low = log(low_tracker, 1, 0.2)
    low_tracker.close()
    assert find_run(uri, best=True, experiment="best-min").run_id == low
    assert find_run(uri, best=True).run_id == low  # the most recent vlmexp experiment


def test_best_follows_the_parents_best_run_tag(uri):
    tracker = study(uri, "tagged")
    log(tracker, 0, 0.9)
    chosen = log(tracker, 1, 0.1)  # not the highest value: only the tag can pick it
    tracker.close()
    MlflowClient(uri).set_tag(tracker.parent_run_id, BEST_RUN, chosen)
    info = find_run(uri, best=True, experiment="tagged")
    assert info.run_id == chosen and info.values == {"acc": 0.1} and info.trial == 1


def test_several_objectives_have_no_single_best_run(uri):
    tracker = study(uri, "pareto", directions=("maximize", "maximize"), objectives=("vl", "text"))
    a = log(tracker, 0, 0.3, objectives=("vl", "text"))
    b = log(tracker, 1, 0.7, objectives=("vl", "text"))
    MlflowClient(uri).set_tag(tracker.parent_run_id, PARETO_RUNS, f"{a},{b}")
    tracker.close()
    with pytest.raises(TrackingError, match=f"several objectives.*Pareto front runs: {a},{b}"):
        find_run(uri, best=True, experiment="pareto")


def test_missing_things_are_one_line_tracking_errors(uri, tmp_path):
    tracker = study(uri, "missing")
    failed = log(tracker, 0, None, "FAIL", with_recipe=False)
    log(tracker, 1, None, "PRUNED")
    tracker.close()
    with pytest.raises(TrackingError, match="'missing' has no completed trial"):
        find_run(uri, best=True, experiment="missing")
    with pytest.raises(TrackingError, match="no recipe.yaml artifact"):
        find_run(uri, run_id=failed)
    with pytest.raises(TrackingError, match="no run 'nope'"):
        find_run(uri, run_id="nope")
    with pytest.raises(TrackingError, match="unknown experiment 'absent'"):
        find_run(uri, best=True, experiment="absent")
    with pytest.raises(TrackingError, match="either a run id or best=True"):
        find_run(None)
    with pytest.raises(TrackingError, match="no MLflow store at"):
        find_run(f"sqlite:///{tmp_path}/absent.db", best=True)
    with pytest.raises(TrackingError, match="no MLflow store at"):
        load_study_config(f"sqlite:///{tmp_path}/absent.db", "abc")
    assert not Path(tmp_path / "absent.db").exists()  # reading never creates a store


def test_load_study_config_reads_the_parents_config_from_a_trial_or_the_parent(uri):
    tracker = study(uri, "config")
    trial = log(tracker, 0, 0.5)
    tracker.close()
    assert load_study_config(uri, trial) == CONFIG
    assert load_study_config(uri, tracker.parent_run_id) == CONFIG
