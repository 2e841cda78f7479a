"""Reading logged runs back from MLflow: a trial's recipe, digest and values, a study's config.

`find_run` serves `python -m vlmexp reproduce`: a run by id, or the best run of an experiment
(the `vlmexp.best_run` tag, else the best COMPLETE trial). Every failure is one `TrackingError`
line that names what is missing.

Example:
    >>> info = find_run("sqlite:///runs/mlflow.db", best=True, experiment="demo")  # doctest: +SKIP
    >>> load_study_config(info.tracking_uri, info.run_id)["eval"]["tasks"]  # doctest: +SKIP
    ['evals/demo/color_shape_val.yaml', 'evals/demo/next_item_val.yaml']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from vlmexp.errors import TrackingError, one_line
from vlmexp.merge.fingerprint import Fingerprint
from vlmexp.merge.recipe import Recipe
from vlmexp.search.mlflow_store import (
    BEST_RUN,
    DEFAULT_URI,
    DIGEST,
    DIRECTIONS,
    EXPERIMENT_KIND,
    FINGERPRINT_PREFIX,
    OBJECTIVES,
    OWN_METRIC_PREFIXES,
    PARENT,
    PARETO_RUNS,
    ROLE,
    STATE,
    TASK_PREFIX,
    TRIAL,
    as_tracking_error,
    direction,
    open_client,
    read_artifact,
    search_all,
    sqlite_file,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run


@dataclass
class RunInfo:
    """A trial run read back from MLflow: what `reproduce` needs and what it compares against."""

    run_id: str
    experiment: str
    recipe: Recipe
    weights_digest: str | None
    metrics: dict[str, float]         # task metrics (no objective./seconds./intermediate. keys)
    values: dict[str, float]          # objective name -> value
    parent_run_id: str | None = None
    trial: int | None = None
    state: str | None = None
    tracking_uri: str = DEFAULT_URI
    tasks: dict[str, str] = field(default_factory=dict)  # task -> identity, from the study run
    # component -> fingerprint of the logged merge's weights (empty for runs logged without)
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)


def find_run(tracking_uri: str | None, *, run_id: str | None = None, best: bool = False,
             experiment: str | None = None) -> RunInfo:
    """Read a trial run back: by id, or the best run of an experiment.

    `best` takes the parent's `vlmexp.best_run` tag when present, else the COMPLETE trial with
    the best objective (single-objective studies). Without `experiment`, the vlmexp experiment
    with the most recent trial is used.

    Raises:
        TrackingError: one line naming what is missing (run, recipe.yaml, completed trial,
            experiment).

    Example:
        >>> info = find_run("sqlite:///runs/mlflow.db", best=True, experiment="demo")  # doctest: +SKIP
        >>> info.recipe.method, info.values  # doctest: +SKIP
        ('ties', {'combined': 0.84})
    """
    uri = tracking_uri or DEFAULT_URI
    if (run_id is None) == (not best):
        raise TrackingError("give either a run id or best=True")
    _check_store_exists(uri)
    with as_tracking_error(f"MLflow ({uri})"):
        client = open_client(uri)
        if run_id is not None:
            run = _get_run(client, run_id, uri)
        else:
            run = _best_run(client, uri, experiment)
        exp = client.get_experiment(run.info.experiment_id)
        rid = run.info.run_id
        parent_id = run.data.tags.get(PARENT)
        study_params = _get_run(client, parent_id, uri).data.params if parent_id else {}
        try:
            text = read_artifact(client, rid, "recipe.yaml")
        except Exception as err:
            raise TrackingError(f"run {rid} has no recipe.yaml artifact "
                                f"({one_line(err, 120)})") from err
    recipe = Recipe.from_yaml_text(text, source=f"run {rid}: recipe.yaml")
    tags, metrics = run.data.tags, run.data.metrics
    trial = tags.get(TRIAL)
    return RunInfo(
        run_id=rid, experiment=exp.name, recipe=recipe, weights_digest=tags.get(DIGEST),
        metrics={k: v for k, v in metrics.items() if not k.startswith(OWN_METRIC_PREFIXES)},
        values={k[len("objective."):]: v for k, v in metrics.items()
                if k.startswith("objective.")},
        parent_run_id=tags.get(PARENT), trial=int(trial) if trial is not None else None,
        state=tags.get(STATE), tracking_uri=uri,
        tasks={k[len(TASK_PREFIX):]: v for k, v in study_params.items()
               if k.startswith(TASK_PREFIX)},
        fingerprints=_fingerprints(tags, rid))


def _fingerprints(tags: dict[str, str], run_id: str) -> dict[str, Fingerprint]:
    """The `vlmexp.fingerprint.<component>` tags of a run; TrackingError naming a bad one."""
    found = {}
    for key, text in tags.items():
        if not key.startswith(FINGERPRINT_PREFIX):
            continue
        try:
            found[key[len(FINGERPRINT_PREFIX):]] = Fingerprint.from_text(text)
        except ValueError:
            raise TrackingError(f"run {run_id}: tag {key} is {text!r}, not 'sum,norm,count'"
                                ) from None
    return found


def load_study_config(tracking_uri: str | None, run_id: str) -> dict[str, Any]:
    """The composed config (`config.yaml`) of the study a run belongs to (or of a parent run).

    Example:
        >>> load_study_config(None, info.run_id)["eval"]["tasks"]  # doctest: +SKIP
        ['evals/demo/color_shape_val.yaml', 'evals/demo/next_item_val.yaml']
    """
    uri = tracking_uri or DEFAULT_URI
    _check_store_exists(uri)
    with as_tracking_error(f"MLflow ({uri})"):
        client = open_client(uri)
        run = _get_run(client, run_id, uri)
        parent = run.data.tags.get(PARENT, run_id)
        try:
            text = read_artifact(client, parent, "config.yaml")
        except Exception as err:
            raise TrackingError(f"run {parent} (the study run of {run_id}) has no config.yaml "
                                f"artifact ({one_line(err, 120)})") from err
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TrackingError(f"run {parent}: config.yaml is not valid YAML") from err
    if not isinstance(config, dict):
        raise TrackingError(f"run {parent}: config.yaml is not a mapping")
    return config


def _check_store_exists(uri: str) -> None:
    """Reading needs an existing SQLite file (MLflow would silently create an empty one)."""
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise TrackingError(f"no MLflow store at {path.resolve()} (tracking URI {uri}); "
                            f"give the tracking URI the study logged to")


def _get_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise TrackingError(f"no run {run_id!r} in {uri}") from err
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"run {run_id} in {uri} is deleted")
    return run


def _best_run(client: MlflowClient, uri: str, experiment: str | None) -> Run:
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage == "deleted":
            raise TrackingError(f"unknown experiment {experiment!r} in {uri}")
        exp_id, exp_name = exp.experiment_id, exp.name
    else:
        exps = client.search_experiments(filter_string=f"tags.`{EXPERIMENT_KIND}` = 'study'")
        if not exps:
            raise TrackingError(f"no vlmexp experiment in {uri}")
        latest = client.search_runs([e.experiment_id for e in exps], f"tags.`{ROLE}` = 'trial'",
                                    max_results=1, order_by=["attributes.start_time DESC"])
        if latest:
            exp_id = latest[0].info.experiment_id
        else:
            exp_id = max(exps, key=lambda e: e.last_update_time or 0).experiment_id
        exp_name = next(e.name for e in exps if e.experiment_id == exp_id)
    parents = search_all(client, [exp_id], f"tags.`{ROLE}` = 'study'",
                          order_by=["attributes.start_time DESC"])
    for parent in parents:
        best_run = parent.data.tags.get(BEST_RUN)
        if best_run:
            return _get_run(client, best_run, uri)
    filt = f"tags.`{ROLE}` = 'trial' and tags.`{STATE}` = 'COMPLETE'"
    trials = search_all(client, [exp_id], filt)
    if parents:  # the most recent study's trials, with its objectives and directions
        tags = parents[0].data.tags
        objectives = [o for o in tags.get(OBJECTIVES, "").split(",") if o]
        directions = [direction(d) for d in tags.get(DIRECTIONS, "").split(",") if d]
        trials = [r for r in trials if r.data.tags.get(PARENT) == parents[0].info.run_id]
    else:
        objectives = sorted({k[len("objective."):] for r in trials for k in r.data.metrics
                             if k.startswith("objective.")})
        directions = ["maximize"] * len(objectives)
    if len(objectives) > 1:
        front = parents[0].data.tags.get(PARETO_RUNS) if parents else None
        hint = f" (Pareto front runs: {front})" if front else ""
        raise TrackingError(f"experiment {exp_name!r} optimizes several objectives "
                            f"({', '.join(objectives)}): there is no single best run; pick a run "
                            f"id{hint}")
    key = f"objective.{objectives[0]}" if objectives else None
    scored = [r for r in trials if key is not None and key in r.data.metrics
              and math.isfinite(r.data.metrics[key])]
    if not scored:
        raise TrackingError(f"experiment {exp_name!r} has no completed trial")
    sign = -1.0 if directions and directions[0] == "minimize" else 1.0
    return max(scored, key=lambda r: (sign * r.data.metrics[key], -(r.info.start_time or 0)))
