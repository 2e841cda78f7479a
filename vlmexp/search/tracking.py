"""MLflow tracking of a study: one experiment, one parent run per study, one child run per trial.

The record follows the project's tracking contract (README, Tracking). A child run holds the flattened recipe as
params; each objective (`objective.<name>`), each task metric, `seconds.<phase>` and the
intermediate values (`intermediate.<objective>`, step = items evaluated) as metrics; the trial
number, state, recipe hash, weights digest and per-component weight fingerprints
(`vlmexp.fingerprint.<component>`: float64 sum, norm and count) as tags; `recipe.yaml` and
`items.json` as artifacts. The parent holds the composed config (`config.yaml` and flattened params), the best
trial or Pareto front (`best.json` / `pareto_front.json` and a CSV twin) and PNG plots.
`vlmexp.search.runs` reads runs back (`python -m vlmexp reproduce`).

Every MLflow or I/O failure is raised as a one-line `TrackingError`, so the study loop can catch
one type and go on.

Example:
    >>> tracker = Tracker(tracking_uri="sqlite:///runs/mlflow.db", experiment="demo",
    ...                   study_name="demo")  # doctest: +SKIP
    >>> tracker.start(cfg, objectives=["combined"], directions=["maximize"])  # doctest: +SKIP
    >>> tracker.log_trial(TrialRecord(number=0, state="COMPLETE", recipe=recipe,
    ...     values={"combined": 0.8}, metrics={}, intermediate=[], seconds={},
    ...     weights_digest=None, items=None))  # doctest: +SKIP
    >>> tracker.finish(study); tracker.close()  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vlmexp.errors import TrackingError, one_line
from vlmexp.merge.fingerprint import Fingerprint
from vlmexp.merge.recipe import Recipe
from vlmexp.search.mlflow_store import (
    BASELINE,
    BEST_RUN,
    BEST_TRIAL,
    DEFAULT_URI,
    DIGEST,
    DIRECTIONS,
    EXPERIMENT_KIND,
    FINGERPRINT_PREFIX,
    MLFLOW_KIND,
    MLFLOW_KIND_VALUE,
    NOTE,
    OBJECTIVES,
    OWN_METRIC_PREFIXES,
    PARENT,
    PARETO_RUNS,
    PARETO_TRIALS,
    REASON,
    RECIPE_HASH,
    ROLE,
    STATE,
    STUDY,
    TASK_PREFIX,
    TRIAL,
    WORKER_PREFIX,
    as_tracking_error,
    direction,
    open_client,
    read_artifact,
    search_all,
    sqlite_file,
)
from vlmexp.search.workers import create_sqlite_atomically
from vlmexp.serial import json_safe

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}

_MAX_KEY, _MAX_PARAM, _MAX_TAG = 250, 6000, 8000  # mlflow.utils.validation limits
_MAX_PARAMS, _MAX_TAGS, _MAX_METRICS = 100, 100, 800  # per log_batch (1000 entities in all)
_MAX_WEIGHT_PLOTS = 6


@dataclass
class TrialRecord:
    """Everything the tracker logs for one trial (pruned and failed ones included)."""

    number: int                       # optuna trial number
    state: str                        # "COMPLETE" | "PRUNED" | "FAIL"
    recipe: Recipe | None             # None if the trial failed before a recipe existed
    values: dict[str, float]          # objective name -> value (empty when pruned/failed)
    metrics: dict[str, float]         # task metrics, e.g. {"demo_color_shape_val.acc": 0.8}
    intermediate: list[tuple[int, dict[str, float]]]  # (items evaluated so far, {objective: v})
    seconds: dict[str, float]         # {"merge": .., "eval": .., "total": ..}
    weights_digest: str | None
    items: dict[str, list[dict]] | None  # per-task per-item results -> artifact items.json
    reason: str | None = None         # why pruned / failed
    baseline: str | None = None       # "base", "vqa alone", "uniform average", ...
    params: dict[str, Any] = field(default_factory=dict)  # optuna's trial.params
    # component -> fingerprint of the merged weights (`ApplyResult.fingerprints`), which
    # `reproduce` compares where the exact digest differs (another device or dtype)
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # more run tags (worker, sampler seed)
    # ms since the epoch of its metrics: set once, so that a record logged again (after a
    # crash or an outage) writes the same rows
    timestamp: int | None = None


# ---------------------------------------------------------------------------- helpers


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: `mlruns/` beside a SQLite store's file.

    None (MLflow's own default, `./mlruns/<experiment id>`) for a file in the working directory
    and for other stores; else `<folder of the file>/mlruns/<experiment name>`.
    """
    path = sqlite_file(tracking_uri)
    if path is None:
        return None
    folder = path.resolve().parent
    if folder == Path.cwd().resolve():
        return None
    return str(folder / "mlruns" / re.sub(r"[^\w.\-]", "_", experiment))


def _key(key: str) -> str:
    """A name MLflow accepts as a param, metric or tag key."""
    return re.sub(r"[^\w\-. /:]", "_", str(key))[:_MAX_KEY]


def _clip(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(value: Any) -> Any:
    """A config (dict, OmegaConf node, ...) as plain YAML-safe containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def flatten_config(config: Mapping[str, Any]) -> dict[str, str]:
    """`a.b.c -> value` strings (lists as JSON), keys and values clipped to MLflow's limits.

    Example:
        >>> flatten_config({"search": {"n_trials": 40, "objectives": ["vl", "text"]}})
        {'search.n_trials': '40', 'search.objectives': '["vl", "text"]'}
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            flat[_key(prefix)] = _clip(text, _MAX_PARAM)

    plain = _plain(config)
    if isinstance(plain, Mapping):
        for k, v in plain.items():
            walk(str(k), v)
    return flat


def _log_batch(client: MlflowClient, run_id: str, *, params: Mapping[str, str] | None = None,
               metrics: Sequence[Any] = (), tags: Mapping[str, Any] | None = None) -> None:
    """log_batch within MLflow's per-request limits (one request in the usual case)."""
    from mlflow.entities import Param, RunTag

    p = [Param(_key(k), _clip(v, _MAX_PARAM)) for k, v in (params or {}).items()]
    t = [RunTag(_key(k), _clip(v, _MAX_TAG)) for k, v in (tags or {}).items()]
    m = list(metrics)
    rounds = max(math.ceil(len(p) / _MAX_PARAMS), math.ceil(len(t) / _MAX_TAGS),
                 math.ceil(len(m) / _MAX_METRICS))
    for i in range(rounds):
        client.log_batch(run_id, metrics=m[i * _MAX_METRICS:(i + 1) * _MAX_METRICS],
                         params=p[i * _MAX_PARAMS:(i + 1) * _MAX_PARAMS],
                         tags=t[i * _MAX_TAGS:(i + 1) * _MAX_TAGS])


def _metric(key: str, value: float, timestamp: int, step: int = 0) -> Any:
    from mlflow.entities import Metric

    return Metric(_key(key), float(value), timestamp, int(step))


# ---------------------------------------------------------------------------- the tracker


class Tracker:
    """Logs a study to MLflow: `start` (parent run), `log_trial` per trial, `finish`, `close`.

    Args:
        tracking_uri: MLflow tracking URI; None is MLflow's default, `sqlite:///mlflow.db` in
            the working directory.
        experiment: the experiment's name (one per study); created if missing.
        study_name: the Optuna study's name; a second Tracker with the same name (a resumed
            study, another worker) re-uses the study's parent run.
        artifact_location: where a new experiment keeps artifacts; default `mlruns/` beside a
            SQLite store's file (`default_artifact_location`).
        log_items: log each trial's per-item results (`TrialRecord.items`) as `items.json`;
            False leaves them out.
        lazy: open the store at first use rather than now (a study goes on while the
            tracking server is down: `vlmexp.search.outbox`).

    Example:
        >>> with Tracker(tracking_uri="sqlite:///runs/mlflow.db", experiment="demo",
        ...              study_name="demo") as tracker:  # doctest: +SKIP
        ...     tracker.start({"search": {"n_trials": 4}}, objectives=["acc"],
        ...                   directions=["maximize"])
    """

    def __init__(self, *, tracking_uri: str | None, experiment: str, study_name: str,
                 artifact_location: str | None = None, log_items: bool = True,
                 lazy: bool = False) -> None:
        self.tracking_uri = tracking_uri or DEFAULT_URI
        self.experiment = experiment
        self.study_name = study_name
        self.log_items = log_items
        self.task_tags: dict[str, str] = {}  # set by start(tasks=...)
        self.parent_run_id: str | None = None
        self.objectives: list[str] = []
        self.directions: list[str] = []
        self._runs: dict[int, str] = {}  # trial number -> child run id, logged by this process
        self._artifact_location = artifact_location
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        if not lazy:
            self.connect()

    def connect(self) -> None:
        """Open the store and the experiment (creating it); TrackingError when it fails."""
        if self._experiment_id is not None:
            return
        with as_tracking_error(f"MLflow ({self.tracking_uri}): open experiment "
                               f"{self.experiment!r}"):
            path = sqlite_file(self.tracking_uri)
            if path is not None:
                create_sqlite_atomically(path, lambda url: open_client(url).search_experiments())
            self._client = self._client or open_client(self.tracking_uri)
            self._experiment_id = self._experiment(
                self._artifact_location
                or default_artifact_location(self.tracking_uri, self.experiment))

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self.connect()
        assert self._client is not None
        return self._client

    @property
    def experiment_id(self) -> str:
        self.connect()
        assert self._experiment_id is not None
        return self._experiment_id

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _experiment(self, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self.client.create_experiment(
                    self.experiment, artifact_location=artifact_location,
                    tags={EXPERIMENT_KIND: "study", MLFLOW_KIND: MLFLOW_KIND_VALUE})
            except MlflowException:  # another worker created it first
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {self.experiment!r} is deleted; restore it "
                                f"(mlflow experiments restore) or choose another name")
        for key, value in ((EXPERIMENT_KIND, "study"), (MLFLOW_KIND, MLFLOW_KIND_VALUE)):
            if exp.tags.get(key) != value:
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def _parents(self) -> list[Run]:
        runs = search_all(self.client, [self.experiment_id], f"tags.`{ROLE}` = 'study'",
                           order_by=["attributes.start_time ASC"])
        mine = [r for r in runs if r.data.tags.get(STUDY) == self.study_name]
        return sorted(mine, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    # ------------------------------------------------------------------ parent run
    def start(self, config: Mapping[str, Any], *, objectives: Sequence[str],
              directions: Sequence[str], tasks: Mapping[str, str] | None = None,
              workers: Mapping[str, int] | None = None) -> str:
        """Create (or, when resuming, re-use) the study's parent run and log the config.

        The composed config goes to `config.yaml` and to flattened params; each evaluation
        task's identity (`Evaluator.identity`: version, protocol, prompt digest) to the param
        `task.<name>`. A resumed study whose
        config changed keeps the first values as params, records the changed keys in the tag
        `vlmexp.config_changed` and the new config as `config.resumed-<time>.yaml`. `workers`
        (worker id -> sampler seed) go to tags `vlmexp.worker.<id>`.

        Returns:
            The parent run's id.
        """
        if len(objectives) != len(directions):
            raise TrackingError(f"{len(objectives)} objectives but {len(directions)} directions")
        self.objectives = list(objectives)
        # every trial run carries its tasks' identities too, so runs compare only like with like
        self.task_tags = {_key(f"{TASK_PREFIX}{name}"): _clip(identity, _MAX_TAG)
                          for name, identity in (tasks or {}).items()}
        self.directions = [direction(d) for d in directions]
        plain = _plain(config)
        params = flatten_config(plain)
        params.update({_key(f"{TASK_PREFIX}{name}"): _clip(identity, _MAX_PARAM)
                       for name, identity in (tasks or {}).items()})
        text = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)
        tags = {ROLE: "study", STUDY: self.study_name, OBJECTIVES: ",".join(self.objectives),
                DIRECTIONS: ",".join(self.directions),
                NOTE: f"vlmexp study {self.study_name!r}: "
                      + ", ".join(f"{o} ({d})" for o, d in zip(self.objectives, self.directions,
                                                               strict=True))
                      + ". One child run per trial (its recipe.yaml rebuilds the merge); here: "
                        "config.yaml, the best trial or Pareto front, plots/."}
        # each worker that joined the study, with its sampler seed
        tags.update({f"{WORKER_PREFIX}{wid}": str(seed) for wid, seed in (workers or {}).items()})
        with as_tracking_error(f"MLflow: start the run of study {self.study_name!r}"):
            existing = self._parents()
            if existing:
                run = existing[0]
                run_id = run.info.run_id
                self.client.update_run(run_id, status="RUNNING")
                logged = run.data.params
                new = {k: v for k, v in params.items() if k not in logged}
                changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
                if changed:
                    tags["vlmexp.config_changed"] = ",".join(changed)
                _log_batch(self.client, run_id, params=new, tags=tags)
                has_config = any(f.path == "config.yaml"
                                 for f in self.client.list_artifacts(run_id))
                if not has_config:
                    self.client.log_text(run_id, text, "config.yaml")
                elif changed or new:
                    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                    self.client.log_text(run_id, text, f"config.resumed-{stamp}.yaml")
            else:
                run = self.client.create_run(self.experiment_id, run_name=f"study-{self.study_name}",
                                             tags=tags)
                run_id = self._settle(run.info.run_id)
                if run_id == run.info.run_id:
                    _log_batch(self.client, run_id, params=params)
                    self.client.log_text(run_id, text, "config.yaml")
                else:  # another worker's run is the study's: this worker joins it
                    _log_batch(self.client, run_id, tags=tags)
        self.parent_run_id = run_id
        return run_id

    def _settle(self, run_id: str) -> str:
        """Two workers that created a parent run at once keep the older one; drop ours if not."""
        parents = self._parents()
        if parents and parents[0].info.run_id != run_id:
            self._drop(run_id)
            return parents[0].info.run_id
        return run_id

    def _drop(self, run_id: str) -> None:
        """Delete a run, ended first (a deleted run left RUNNING would stay RUNNING)."""
        self.client.set_terminated(run_id, "KILLED")
        self.client.delete_run(run_id)

    # ------------------------------------------------------------------ trials
    def log_trial(self, record: TrialRecord) -> str:
        """Log one trial as a child run of the study's run (status from its state).

        The run gets `recipe.yaml` when the record has a recipe, and `items.json` when it has
        items and the tracker was made with `log_items=True`. A trial has one child run: one
        already logged in the same state is kept (nothing is logged twice); one left half
        logged (RUNNING) by a crash, or logged in another state, is replaced.

        Returns:
            The child run's id.
        """
        if self.parent_run_id is None:
            raise TrackingError("log_trial before start(): the study has no parent run")
        state = record.state.upper()
        if state not in STATUS:
            raise TrackingError(f"trial {record.number}: state {record.state!r} is not one of "
                                f"{', '.join(STATUS)}")
        name = f"trial-{record.number:04d}" + (f" ({record.baseline})" if record.baseline else "")
        run_id = None
        with as_tracking_error(f"MLflow: log trial {record.number}"):
            for run in self._trial_runs(record.number):
                if run.info.status != "RUNNING" and run.data.tags.get(STATE) == state:
                    self._runs[record.number] = run.info.run_id
                    return run.info.run_id
                self._drop(run.info.run_id)  # half logged, or superseded
            tags, params, metrics = _trial_entries(record, state, self.parent_run_id,
                                                   self.study_name)
            tags.update(self.task_tags)
            try:
                run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
                run_id = run.info.run_id
                _log_batch(self.client, run_id, params=params, metrics=metrics)
                if record.recipe is not None:
                    self.client.log_text(run_id, record.recipe.to_yaml(), "recipe.yaml")
                if self.log_items and record.items is not None:
                    self.client.log_text(run_id, json.dumps(json_safe(record.items)),
                                         "items.json")
                self.client.set_terminated(run_id, STATUS[state])
                run_id = self._settle_trial(record.number, run_id)
            except Exception:
                if run_id is not None:  # do not leave a half-logged run RUNNING
                    try:
                        self.client.set_terminated(run_id, "FAILED")
                    except Exception:  # noqa: BLE001 - the first error is the one to report
                        pass
                raise
        self._runs[record.number] = run_id
        return run_id

    def _trial_runs(self, number: int) -> list[Run]:
        """The study's active child runs of trial `number`, oldest first."""
        filt = (f"tags.`{PARENT}` = '{self.parent_run_id}' and tags.`{TRIAL}` = '{number}'")
        runs = search_all(self.client, [self.experiment_id], filt)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _settle_trial(self, number: int, run_id: str) -> str:
        """Two workers that logged one trial at once keep the older run; drop ours if not."""
        runs = self._trial_runs(number)
        if runs and runs[0].info.run_id != run_id:
            self._drop(run_id)
            return runs[0].info.run_id
        return run_id

    def child_runs(self) -> dict[int, str]:
        """Trial number -> child run id, for every trial of this study (all workers)."""
        if self.parent_run_id is None:
            return dict(self._runs)
        with as_tracking_error("MLflow: list the study's trial runs"):
            runs = search_all(self.client, [self.experiment_id],
                               f"tags.`{PARENT}` = '{self.parent_run_id}'",
                               order_by=["attributes.start_time ASC"])
        found = {int(r.data.tags[TRIAL]): r.info.run_id for r in runs if TRIAL in r.data.tags}
        return {**found, **self._runs}

    # ------------------------------------------------------------------ end of study
    def finish(self, study: optuna.Study, *,
               test_results: Mapping[int, Mapping[str, float]] | None = None) -> None:
        """Log the best trial (one objective) or Pareto front (several) and the plots.

        Args:
            study: the Optuna study; its best trial(s) are read back from their runs.
            test_results: trial number -> metrics on held-out test tasks, added to the table,
                to those trials' runs and (one objective) to the parent as `test.<metric>`.
        """
        if self.parent_run_id is None:
            raise TrackingError("finish before start(): the study has no parent run")
        import optuna

        parent = self.parent_run_id
        with as_tracking_error(f"MLflow: finish study {self.study_name!r}"):
            runs = self.child_runs()
            directions = [d.name.lower() for d in study.directions]
            names = self._objective_names(study, len(directions))
            multi = len(directions) > 1
            trials = study.get_trials(deepcopy=False)
            complete = [t for t in trials
                        if t.state == optuna.trial.TrialState.COMPLETE and t.values]
            if multi:
                best = sorted(study.best_trials, key=lambda t: t.number)
            else:
                best = [study.best_trial] if complete else []
            rows = [self._row(t, runs, names, test_results) for t in best]
            table = "pareto_front" if multi else "best"
            self.client.log_text(parent, json.dumps(json_safe(rows), indent=2), f"{table}.json")
            self.client.log_text(parent, _csv(rows), f"{table}.csv")
            now = int(time.time() * 1000)
            tags: dict[str, str] = {}
            metrics = []
            if multi:
                tags[PARETO_TRIALS] = ",".join(str(r["trial"]) for r in rows)
                tags[PARETO_RUNS] = ",".join(str(r["run_id"]) for r in rows if r["run_id"])
                metrics.append(_metric("pareto.size", len(rows), now))
            elif rows:
                top = rows[0]
                tags[BEST_TRIAL] = str(top["trial"])
                if top["run_id"]:
                    tags[BEST_RUN] = top["run_id"]
                metrics += [_metric(f"best.{k}", v, now) for k, v in top["values"].items()
                            if v is not None]
                metrics += [_metric(f"test.{k}", v, now) for k, v in (top["test"] or {}).items()]
            _log_batch(self.client, parent, metrics=metrics, tags=tags)
            for number, values in (test_results or {}).items():
                if number in runs:
                    _log_batch(self.client, runs[number],
                               metrics=[_metric(f"test.{k}", v, now) for k, v in values.items()])
            self._plots(study, complete, names, rows)

    def _objective_names(self, study: optuna.Study, count: int) -> list[str]:
        if len(self.objectives) == count:
            return list(self.objectives)
        names = study.metric_names
        if names and len(names) == count:
            return list(names)
        return ["objective"] if count == 1 else [f"objective_{i}" for i in range(count)]

    def _row(self, trial: optuna.trial.FrozenTrial, runs: Mapping[int, str], names: list[str],
             test_results: Mapping[int, Mapping[str, float]] | None) -> dict[str, Any]:
        """A best / Pareto table row: the trial's values and params, its run's metrics and tags."""
        number = trial.number
        run_id = runs.get(number)
        values = dict(zip(names, trial.values or [], strict=False))
        params = dict(trial.params)
        metrics: dict[str, float] = {}
        baseline = digest = None
        if run_id:
            run = self.client.get_run(run_id)
            metrics = {k: v for k, v in run.data.metrics.items()
                       if not k.startswith(OWN_METRIC_PREFIXES)}
            baseline = run.data.tags.get(BASELINE)
            digest = run.data.tags.get(DIGEST)
        test = dict((test_results or {}).get(number) or {}) or None
        return {"trial": number, "run_id": run_id, "baseline": baseline, "values": values,
                "metrics": metrics, "test": test, "params": params, "weights_digest": digest}

    def _plots(self, study: optuna.Study, complete: Sequence[Any], names: list[str],
               rows: list[dict[str, Any]]) -> None:
        from vlmexp.search import plots

        figures = plots.history_figures(study, names)
        if len(names) in (2, 3) and complete:
            figures["pareto_front"] = plots.pareto_figure(study, names)
        for row in rows[:_MAX_WEIGHT_PLOTS]:
            if not row["run_id"]:
                continue
            try:
                recipe = Recipe.from_yaml_text(read_artifact(self.client, row["run_id"],
                                                              "recipe.yaml"))
            except Exception as err:  # noqa: BLE001 - a missing plot must not end the study
                warnings.warn(f"no weights-vs-depth plot for trial {row['trial']}: "
                              f"{one_line(err, 300)}", stacklevel=2)
                continue
            fig = plots.weights_vs_depth_figure(
                recipe, title=f"trial {row['trial']} ({recipe.method}): parameters vs depth")
            if fig is not None:
                suffix = f"_trial-{row['trial']:04d}" if len(names) > 1 else ""
                figures[f"weights_vs_depth{suffix}"] = fig
        if len(complete) >= 4 and len({p for t in complete for p in t.params}) >= 2:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*low `target` values")
                    figures.update(plots.importances_figures(study, names))
            except Exception as err:  # noqa: BLE001 - e.g. no parameter common to all trials
                warnings.warn(f"parameter importances skipped: {one_line(err, 300)}",
                              stacklevel=2)
        try:
            for name, fig in figures.items():
                self._figure(fig, f"plots/{name}.png")
        finally:
            plots.close(figures)

    def _figure(self, fig: Any, path: str) -> None:
        assert self.parent_run_id is not None
        self.client.log_figure(self.parent_run_id, fig, path, save_kwargs={"dpi": 100})

    def close(self) -> None:
        """Mark the parent run FINISHED (a resumed study sets it RUNNING again)."""
        if self.parent_run_id is None:
            return
        with as_tracking_error(f"MLflow: close the run of study {self.study_name!r}"):
            self.client.set_terminated(self.parent_run_id, "FINISHED")


def _trial_entries(record: TrialRecord, state: str, parent_run_id: str, study_name: str,
                   ) -> tuple[dict[str, str], dict[str, str], list[Any]]:
    """A trial's tags, params and metrics (values that are None are left out)."""
    tags: dict[str, str] = {PARENT: parent_run_id, ROLE: "trial", STUDY: study_name,
                            TRIAL: str(record.number), STATE: state}
    if record.recipe is not None:
        tags[RECIPE_HASH] = record.recipe.content_hash()
    if record.weights_digest:
        tags[DIGEST] = record.weights_digest
    for component, fingerprint in record.fingerprints.items():
        tags[f"{FINGERPRINT_PREFIX}{component}"] = fingerprint.to_text()
    if record.baseline:
        tags[BASELINE] = record.baseline
    if record.reason:
        tags[REASON] = one_line(record.reason, _MAX_TAG)
    tags[NOTE] = _describe(record, state)
    tags.update({k: str(v) for k, v in record.tags.items()})
    params = record.recipe.flat_params() if record.recipe is not None else {}
    params.update({f"optuna.{k}": json.dumps(v) if isinstance(v, list) else str(v)
                   for k, v in record.params.items()})
    now = record.timestamp if record.timestamp is not None else int(time.time() * 1000)
    named = [(f"objective.{k}", v, 0) for k, v in record.values.items()]
    named += [(k, v, 0) for k, v in record.metrics.items()]
    named += [(f"seconds.{k}", v, 0) for k, v in record.seconds.items()]
    named += [(f"intermediate.{k}", v, step)
              for step, values in record.intermediate for k, v in values.items()]
    metrics = [_metric(k, v, now, step) for k, v, step in named if v is not None]
    return tags, params, metrics


def _describe(record: TrialRecord, state: str) -> str:
    """The run's description in the MLflow UI: what was merged and how the trial ended."""
    what = f"trial {record.number}" + (f" ({record.baseline})" if record.baseline else "")
    if record.recipe is not None:
        donors = ", ".join(d.name for d in record.recipe.donors)
        what += f": {record.recipe.method} merge of {donors} into the base"
    outcome = {"COMPLETE": ", ".join(f"{k} = {v:.4g}" for k, v in record.values.items())
               or "complete",
               "PRUNED": "pruned" + (f" ({record.reason})" if record.reason else ""),
               "FAIL": "failed" + (f": {record.reason}" if record.reason else "")}[state]
    return one_line(f"{what}; {outcome}. recipe.yaml rebuilds it "
                    f"(python -m vlmexp reproduce RUN_ID).", _MAX_TAG)


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The best / Pareto table as CSV: trial, run, baseline, objectives, metrics, test, params."""
    flat_rows = []
    for row in rows:
        flat: dict[str, Any] = {"trial": row["trial"], "run_id": row["run_id"] or "",
                                "baseline": row["baseline"] or ""}
        flat.update({f"objective.{k}": v for k, v in row["values"].items()})
        flat.update(row["metrics"])
        flat.update({f"test.{k}": v for k, v in (row["test"] or {}).items()})
        flat.update({f"param.{k}": v for k, v in row["params"].items()})
        flat_rows.append(flat)
    columns: list[str] = []
    for flat in flat_rows:
        columns += [c for c in flat if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or ["trial"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat_rows)
    return buf.getvalue()
