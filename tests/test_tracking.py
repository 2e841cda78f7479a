"""MLflow tracking: parent/child runs, statuses, params, metrics, tags, artifacts, plots."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from vlmexp.errors import TrackingError
from vlmexp.merge.fingerprint import Fingerprint
from vlmexp.merge.recipe import Recipe
from vlmexp.search import plots
from vlmexp.search.tracking import Tracker, TrialRecord, flatten_config

optuna.logging.set_verbosity(optuna.logging.WARNING)
PNG = b"\x89PNG\r\n\x1a\n"
CONFIG = {"study_name": "s", "search": {"n_trials": 3, "objectives": ["acc"]},
          "eval": {"tasks": ["evals/demo/a.yaml"], "objectives": {"acc": {"a": 1.0}}}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """One SQLite store for the module (creating its tables takes seconds); tests use their
    own experiments."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root


def make_recipe(weight: float = 0.5, schedule: tuple[float, float] = (0.2, 0.8)) -> Recipe:
    return Recipe.from_dict({
        "vlmexp_recipe": 1, "method": "task_arithmetic",
        "base": {"path": "zoo/base"},
        "donors": [{"name": "vqa", "path": "zoo/vqa"}, {"name": "text", "path": "zoo/text"}],
        "parameters": {"lambda": 1.0},
        "components": {"projector": {"vqa": {"weight": weight}},
                       "language": {"vqa": {"weight": list(schedule)}, "text": {"weight": 0.3}}},
    })


def record(number: int, state: str = "COMPLETE", value: float | None = 0.5,
           **kw) -> TrialRecord:
    done = state == "COMPLETE"
    base = dict(
        number=number, state=state, recipe=make_recipe(), values={"acc": value} if done else {},
        metrics={"demo_a.acc": value, "demo_a.margin": 0.1} if done else {},
        intermediate=[(4, {"acc": 0.25}), (16, {"acc": value or 0.0})] if done else [],
        seconds={"merge": 0.01, "eval": 0.2, "total": 0.25}, weights_digest=f"isum2:{number:064x}",
        items={"demo_a": [{"index": 0, "correct": True, "margin": float("nan")}]},
        params={"w": 0.5, "method": "ta"})
    base.update(kw)
    return TrialRecord(**base)


def artifact(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_text()


def test_trials_are_child_runs_with_status_params_metrics_tags_artifacts(store, tmp_path):
    uri, _ = store
    tracker = Tracker(tracking_uri=uri, experiment="statuses", study_name="statuses")
    parent = tracker.start(CONFIG, objectives=["acc"], directions=["maximize"])
    ok = tracker.log_trial(record(0, baseline="base", fingerprints={
        "language": Fingerprint(total=0.1, norm=3.0000000000000004, count=12)}))
    pruned = tracker.log_trial(record(1, "PRUNED", reason="below the median at 4 items",
                                      intermediate=[(4, {"acc": 0.1})]))
    failed = tracker.log_trial(record(2, "FAIL", recipe=None, weights_digest=None, items=None,
                                      reason="MergeError: merged tensor x has NaN\nsecond line"))
    tracker.close()
    client = MlflowClient(uri)

    p = client.get_run(parent)
    assert p.data.tags["vlmexp.role"] == "study" and p.data.tags["vlmexp.study"] == "statuses"
    assert p.info.status == "FINISHED"
    assert p.data.params["search.n_trials"] == "3"
    assert p.data.params["eval.tasks"] == '["evals/demo/a.yaml"]'
    assert yaml.safe_load(artifact(client, parent, "config.yaml", tmp_path)) == CONFIG

    runs = {rid: client.get_run(rid) for rid in (ok, pruned, failed)}
    assert [runs[r].info.status for r in (ok, pruned, failed)] == ["FINISHED", "KILLED", "FAILED"]
    assert [runs[r].info.run_name for r in (ok, pruned, failed)] == [
        "trial-0000 (base)", "trial-0001", "trial-0002"]
    for rid in runs:
        assert runs[rid].data.tags["mlflow.parentRunId"] == parent
        assert runs[rid].data.tags["vlmexp.role"] == "trial"

    r = runs[ok]
    assert r.data.params["method"] == "task_arithmetic"
    assert r.data.params["components.language.vqa.weight"] == "[0.2, 0.8]"
    assert r.data.params["components.projector.vqa.weight"] == "0.5"
    assert r.data.params["optuna.w"] == "0.5" and r.data.params["optuna.method"] == "ta"
    assert r.data.metrics == {
        "objective.acc": 0.5, "demo_a.acc": 0.5, "demo_a.margin": 0.1, "seconds.merge": 0.01,
        "seconds.eval": 0.2, "seconds.total": 0.25, "intermediate.acc": 0.5}
    history = client.get_metric_history(ok, "intermediate.acc")
    assert [(m.step, m.value) for m in history] == [(4, 0.25), (16, 0.5)]
    tags = r.data.tags
    assert tags["vlmexp.trial"] == "0" and tags["vlmexp.state"] == "COMPLETE"
    assert tags["vlmexp.recipe_hash"] == make_recipe().content_hash()
    assert tags["vlmexp.weights_digest"] == f"isum2:{0:064x}"
    assert tags["vlmexp.baseline"] == "base"
    assert tags["vlmexp.fingerprint.language"] == "0.1,3.0000000000000004,12"
    assert not any(k.startswith("vlmexp.fingerprint.") for k in runs[failed].data.tags)
    # the descriptions the MLflow UI shows on each run's page
    assert tags["mlflow.note.content"] == (
        "trial 0 (base): task_arithmetic merge of vqa, text into the base; acc = 0.5. "
        "recipe.yaml rebuilds it (python -m vlmexp reproduce RUN_ID).")
    assert runs[pruned].data.tags["mlflow.note.content"].startswith(
        "trial 1: task_arithmetic merge of vqa, text into the base; pruned (below the median")
    assert runs[failed].data.tags["mlflow.note.content"].startswith(
        "trial 2; failed: MergeError: merged tensor x has NaN second line.")
    assert p.data.tags["mlflow.note.content"].startswith("vlmexp study 'statuses': acc (maximize).")
    exp = client.get_experiment_by_name("statuses")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # a training view
    text = artifact(client, ok, "recipe.yaml", tmp_path / "ok")
    assert Recipe.from_yaml_text(text) == make_recipe()
    items = json.loads(artifact(client, ok, "items.json", tmp_path / "ok"))
    assert items == {"demo_a": [{"index": 0, "correct": True, "margin": None}]}

    assert runs[pruned].data.tags["vlmexp.reason"] == "below the median at 4 items"
    assert runs[pruned].data.tags["vlmexp.state"] == "PRUNED"
    assert [(m.step, m.value) for m in client.get_metric_history(pruned, "intermediate.acc")] == [
        (4, 0.1)]
    assert runs[failed].data.tags["vlmexp.reason"] == (
        "MergeError: merged tensor x has NaN second line")  # one_line joins an error's lines
    assert "vlmexp.recipe_hash" not in runs[failed].data.tags
    assert {a.path for a in client.list_artifacts(failed)} == set()
    assert runs[failed].data.metrics == {"seconds.merge": 0.01, "seconds.eval": 0.2,
                                         "seconds.total": 0.25}


@pytest.mark.parametrize("log_items", [True, False])
def test_log_items_decides_whether_items_json_is_logged(store, log_items):
    uri, _ = store
    name = f"items-{log_items}"
    tracker = Tracker(tracking_uri=uri, experiment=name, study_name=name, log_items=log_items)
    tracker.start(CONFIG, objectives=["acc"], directions=["maximize"])
    run_id = tracker.log_trial(record(0))  # a record with items
    tracker.close()
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert logged == ({"recipe.yaml", "items.json"} if log_items else {"recipe.yaml"})


def test_resume_reuses_the_parent_run(store):
    uri, _ = store
    first = Tracker(tracking_uri=uri, experiment="resume", study_name="resume")
    parent = first.start(CONFIG, objectives=["acc"], directions=["maximize"])
    first.log_trial(record(0))
    first.close()
    changed = {**CONFIG, "search": {"n_trials": 6, "objectives": ["acc"]}}
    second = Tracker(tracking_uri=uri, experiment="resume", study_name="resume")
    assert second.start(changed, objectives=["acc"], directions=["maximize"]) == parent
    second.log_trial(record(1))
    client = MlflowClient(uri)
    run = client.get_run(parent)
    assert run.info.status == "RUNNING"
    assert run.data.params["search.n_trials"] == "3"  # params are immutable: the first value
    assert run.data.tags["vlmexp.config_changed"] == "search.n_trials"
    assert any(a.path.startswith("config.resumed-") for a in client.list_artifacts(parent))
    assert set(second.child_runs()) == {0, 1}
    second.close()
    exp = client.get_experiment_by_name("resume")
    parents = client.search_runs([exp.experiment_id], "tags.`vlmexp.role` = 'study'")
    assert len(parents) == 1
    # another study in the same experiment gets its own parent
    other = Tracker(tracking_uri=uri, experiment="resume", study_name="other")
    assert other.start(CONFIG, objectives=["acc"], directions=["maximize"]) != parent


def _told_study(directions: list[str], values: list[tuple[float, ...]]) -> optuna.Study:
    study = optuna.create_study(directions=directions)
    for i, v in enumerate(values):
        trial = study.ask()
        trial.suggest_float("w_projector", 0.0, 1.0)
        trial.suggest_float("w_language", 0.0, 1.0)
        if v:
            study.tell(trial, list(v) if len(v) > 1 else v[0])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        assert trial.number == i
    return study


def _log_study(tracker: Tracker, study: optuna.Study, names: list[str]) -> dict[int, str]:
    runs = {}
    for t in study.trials:
        done = t.state == optuna.trial.TrialState.COMPLETE
        recipe = make_recipe(t.params["w_projector"], (0.0, t.params["w_language"]))
        runs[t.number] = tracker.log_trial(TrialRecord(
            number=t.number, state="COMPLETE" if done else "PRUNED", recipe=recipe,
            values=dict(zip(names, t.values, strict=True)) if done else {},
            metrics={"demo_a.acc": t.values[0]} if done else {}, intermediate=[],
            seconds={"merge": 0.0}, weights_digest=f"isum2:{t.number}", items=None,
            params=t.params))
    return runs


def test_finish_single_objective_logs_best_table_and_plots(store, tmp_path):
    uri, _ = store
    study = _told_study(["maximize"], [(0.3,), (0.7,), (), (0.5,), (0.6,), (0.2,)])
    tracker = Tracker(tracking_uri=uri, experiment="single", study_name="single")
    parent = tracker.start(CONFIG, objectives=["acc"], directions=["maximize"])
    runs = _log_study(tracker, study, ["acc"])
    tracker.finish(study, test_results={1: {"demo_a_test.acc": 0.65}})
    tracker.close()
    client = MlflowClient(uri)
    paths = {a.path for a in client.list_artifacts(parent, "plots")}
    assert paths == {"plots/optimization_history.png", "plots/weights_vs_depth.png",
                     "plots/param_importances.png"}
    for p in paths:
        local = client.download_artifacts(parent, p, str(tmp_path))
        assert Path(local).read_bytes()[:8] == PNG
    best = json.loads(artifact(client, parent, "best.json", tmp_path))
    assert [(r["trial"], r["run_id"], r["values"]) for r in best] == [(1, runs[1], {"acc": 0.7})]
    assert best[0]["test"] == {"demo_a_test.acc": 0.65}
    assert best[0]["params"] == study.trials[1].params
    assert best[0]["metrics"] == {"demo_a.acc": 0.7}
    assert best[0]["weights_digest"] == "isum2:1" and best[0]["baseline"] is None  # from its run
    table = artifact(client, parent, "best.csv", tmp_path).splitlines()
    assert table[0].startswith("trial,run_id,baseline,objective.acc,demo_a.acc,test.demo_a_test.acc")
    assert table[1].startswith(f"1,{runs[1]},,0.7,0.7,0.65")
    run = client.get_run(parent)
    assert run.data.tags["vlmexp.best_trial"] == "1"
    assert run.data.tags["vlmexp.best_run"] == runs[1]
    assert run.data.metrics["best.acc"] == 0.7
    assert run.data.metrics["test.demo_a_test.acc"] == 0.65
    assert client.get_run(runs[1]).data.metrics["test.demo_a_test.acc"] == 0.65


def test_finish_two_objectives_logs_pareto_front(store, tmp_path):
    uri, _ = store
    study = _told_study(["maximize", "maximize"], [(0.3, 0.9), (0.7, 0.4), (0.2, 0.2)])
    tracker = Tracker(tracking_uri=uri, experiment="pareto", study_name="pareto")
    parent = tracker.start(CONFIG, objectives=["vl", "text"], directions=["maximize", "maximize"])
    runs = _log_study(tracker, study, ["vl", "text"])
    tracker.finish(study)
    client = MlflowClient(uri)
    paths = {a.path for a in client.list_artifacts(parent, "plots")}
    # 3 complete trials: too few for parameter importances, which are skipped; one history per
    # objective (Optuna draws the best-so-far line for a single objective only)
    assert paths == {"plots/optimization_history_vl.png", "plots/optimization_history_text.png",
                     "plots/pareto_front.png",
                     "plots/weights_vs_depth_trial-0000.png",
                     "plots/weights_vs_depth_trial-0001.png"}
    front = json.loads(artifact(client, parent, "pareto_front.json", tmp_path))
    assert [(r["trial"], r["run_id"], r["values"]) for r in front] == [
        (0, runs[0], {"vl": 0.3, "text": 0.9}), (1, runs[1], {"vl": 0.7, "text": 0.4})]
    assert "pareto_front.csv" in {a.path for a in client.list_artifacts(parent)}
    tags = client.get_run(parent).data.tags
    assert tags["vlmexp.pareto_trials"] == "0,1"
    assert tags["vlmexp.pareto_runs"] == f"{runs[0]},{runs[1]}"
    assert "vlmexp.best_run" not in tags


def test_tracking_failures_are_one_line_tracking_errors(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(TrackingError) as err:
        Tracker(tracking_uri=f"sqlite:///{tmp_path}/a-file/mlflow.db", experiment="x",
                study_name="x")
    assert "\n" not in str(err.value) and str(err.value).startswith("MLflow (sqlite:///")


def test_log_trial_before_start_and_bad_state(store):
    uri, _ = store
    tracker = Tracker(tracking_uri=uri, experiment="order", study_name="order")
    with pytest.raises(TrackingError, match="before start"):
        tracker.log_trial(record(0))
    tracker.start({}, objectives=["acc"], directions=["maximize"])
    with pytest.raises(TrackingError, match="state 'WAITING'"):
        tracker.log_trial(record(0, "WAITING"))


def test_flatten_config_clips_to_mlflow_limits():
    flat = flatten_config({"a": {"b": "x" * 7000, "c": [1, 2]}, "d": {}, "e weird!": None})
    assert len(flat["a.b"]) == 6000 and flat["a.b"].endswith("…")
    assert flat["a.c"] == "[1, 2]" and flat["d"] == "{}" and flat["e weird_"] == "None"


def test_weights_vs_depth_draws_each_component_and_donor():
    fig = plots.weights_vs_depth_figure(make_recipe(0.4, (0.2, 0.8)))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "weight"
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    assert set(lines) == {"language/text", "language/vqa", "projector/vqa"}
    assert lines["language/vqa"][0] == pytest.approx(0.2)
    assert lines["language/vqa"][50] == pytest.approx(0.5)
    assert lines["language/vqa"][100] == pytest.approx(0.8)
    assert set(lines["projector/vqa"]) == {0.4}
    empty = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
                              "donors": [{"name": "vqa", "path": "d"}]})
    assert plots.weights_vs_depth_figure(empty) is None


def test_weights_vs_depth_draws_tied_components_as_one_line():
    """The demo ties embed and head to the language model: one line each donor, not three drawn
    on top of each other; donors differ in line style so a crossing line stays visible."""
    tied = {"vqa": {"weight": 0.34}, "text": {"weight": 1.61}}
    recipe = Recipe.from_dict({
        "method": "task_arithmetic", "base": {"path": "b"},
        "donors": [{"name": "vqa", "path": "d"}, {"name": "text", "path": "t"}],
        "components": {"head": tied, "vision": {"vqa": {"weight": 1.12}},
                       "language": tied, "embed": tied}})
    lines = plots.weights_vs_depth_figure(recipe).axes[0].get_lines()
    assert [(line.get_label(), float(line.get_ydata()[0]), line.get_linestyle())
            for line in lines] == [("vision/vqa", 1.12, "-"),
                                   ("language+embed+head/vqa", 0.34, "-"),
                                   ("language+embed+head/text", 1.61, "--")]


def test_study_plots_are_optunas():
    study = _told_study(["maximize"], [(0.3,), (0.7,), (), (0.5,), (0.6,), (0.2,)])
    figs = plots.history_figures(study, ["acc"])
    assert list(figs) == ["optimization_history"]
    best = [line for line in figs["optimization_history"].axes[0].get_lines()
            if line.get_label() == "Best Value"]
    assert list(best[0].get_ydata()) == [0.3, 0.7, 0.7, 0.7, 0.7, 0.7]
    imp = plots.importances_figures(study, ["acc"])
    assert list(imp) == ["param_importances"]
    labels = {t.get_text() for t in imp["param_importances"].axes[0].get_yticklabels()}
    assert labels == {"w_projector", "w_language"}
    plots.close({**figs, **imp})

    two = _told_study(["maximize", "minimize"], [(0.3, 0.9), (0.7, 0.4), (0.2, 0.95), (0.6, 0.5)])
    figs = plots.history_figures(two, ["vl", "loss"])
    assert list(figs) == ["optimization_history_vl", "optimization_history_loss"]
    front = plots.pareto_figure(two, ["vl", "loss"])
    ax = front.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("vl", "loss")
    # the front is study.best_trials: 0.3/0.9 and 0.2/0.95 are dominated by 0.7/0.4
    assert sorted(a.get_text() for a in ax.texts) == ["1"]
    plots.close({**figs, "front": front})


def test_finish_without_a_complete_trial_logs_an_empty_table(store, tmp_path):
    uri, _ = store
    study = _told_study(["maximize"], [(), ()])
    tracker = Tracker(tracking_uri=uri, experiment="empty", study_name="empty")
    parent = tracker.start(CONFIG, objectives=["acc"], directions=["maximize"])
    _log_study(tracker, study, ["acc"])
    tracker.finish(study)
    client = MlflowClient(uri)
    assert json.loads(artifact(client, parent, "best.json", tmp_path)) == []
    assert {a.path for a in client.list_artifacts(parent, "plots")} == {
        "plots/optimization_history.png"}
    assert "vlmexp.best_run" not in client.get_run(parent).data.tags
