"""The study loop: compose config → build space → ask → merge → evaluate → tell → log.

Everything heavy is set up once per process (`setup`): the models (the base live, the donors as
task vectors), the processor, the evaluator and its data, the Optuna study and the MLflow
tracker. Each trial then only merges in place and evaluates, in rungs when pruning is on.

Example:
    >>> from vlmexp.config import compose
    >>> result = run_search(compose(["search.n_trials=3"]))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from vlmexp.config import eval_config, to_dict
from vlmexp.errors import ConfigError, EvalError, MergeError, VlmexpError
from vlmexp.merge.engine import MergeEngine
from vlmexp.merge.recipe import ModelRef, Recipe
from vlmexp.search.space import SearchSpace

BASELINE_ATTR = "vlmexp.baseline"


@dataclass
class Setup:
    """What a study holds for its whole life."""

    cfg: DictConfig
    engine: MergeEngine
    evaluator: Any
    space: SearchSpace
    study: optuna.Study
    tracker: Any
    objectives: list[str]


@dataclass
class TrialOutcome:
    number: int
    state: str
    values: dict[str, float] = field(default_factory=dict)
    recipe: Recipe | None = None


# ---------------------------------------------------------------------- setup helpers


def resolve_models(models: Mapping[str, Any], *, progress: bool = True) -> tuple[ModelRef,
                                                                                list[ModelRef]]:
    """The base and donor references, `zoo:NAME` paths resolved (building the zoo if needed)."""
    zoo = None

    def path_of(spec: str) -> str:
        nonlocal zoo
        if not spec.startswith("zoo:"):
            return spec
        if zoo is None:
            from vlmexp.zoo.build import ensure_zoo

            zoo = ensure_zoo(models.get("zoo_dir"), progress=progress)
        name = spec.removeprefix("zoo:")
        folders = {"base": zoo.base, "vqa-expert": zoo.vqa_expert,
                   "text-expert": zoo.text_expert}
        if name not in folders:
            raise ConfigError(f"models: {spec!r} is not a zoo model (zoo: {', '.join(folders)})")
        return str(folders[name])

    base = ModelRef("base", path_of(str(models["base"])))
    donors = [ModelRef(str(name), path_of(str(d["path"])), map=str(d.get("map", "auto")))
              for name, d in (models.get("donors") or {}).items()]
    if not donors:
        raise ConfigError("models.donors: name at least one donor")
    return base, donors


def _setup_engine(cfg: DictConfig, base: ModelRef, donors: list[ModelRef]) -> MergeEngine:
    from vlmexp.checkpoint import open_model

    device = None if cfg.device == "auto" else str(cfg.device)
    engine = MergeEngine(open_model(base.path), device=device, vocab=str(cfg.merge.vocab),
                         progress=True)
    engine.base_path = base.path
    for d in donors:
        engine.add_donor(d.name, open_model(d.path, load_processor=False), map=d.map)
    if engine.processor is None:
        raise ConfigError(f"models.base: {base.path} has no processor/tokenizer files")
    return engine


def _device(cfg: DictConfig) -> str:
    from vlmexp.checkpoint import resolve_device

    return resolve_device(None if cfg.device == "auto" else str(cfg.device))


def _setup_evaluator(cfg: DictConfig, processor: Any, *, test: bool = False) -> Any:
    from vlmexp.eval import Evaluator

    return Evaluator.from_config(eval_config(to_dict(cfg.eval), device=_device(cfg), test=test),
                                 processor)


def _sampler(cfg: DictConfig, n_objectives: int) -> optuna.samplers.BaseSampler:
    name, seed = cfg.search.sampler, int(cfg.search.seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)
    if name == "cmaes":
        if n_objectives > 1:
            raise ConfigError("search.sampler: cmaes optimises one objective; use nsga2 or tpe")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    return optuna.samplers.RandomSampler(seed=seed)


def default_storage() -> str:
    return "sqlite:///optuna.db"


def _setup_study(cfg: DictConfig, objectives: list[str]) -> optuna.Study:
    storage = cfg.search.storage or default_storage()
    try:
        return optuna.create_study(
            study_name=str(cfg.study_name), storage=storage, load_if_exists=True,
            directions=["maximize"] * len(objectives), sampler=_sampler(cfg, len(objectives)))
    except ValueError as err:  # e.g. resuming with another number of objectives
        raise ConfigError(f"search.storage {storage}: study {cfg.study_name!r}: {err}") from None


def recover_stale_trials(study: optuna.Study) -> int:
    """Mark trials a crash left RUNNING as failed and enqueue their parameters again.

    Only for trials of this study that no live worker holds: callers run this once at start-up;
    with several workers sharing a study, start them after the previous run has ended.
    """
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs=dict(t.user_attrs),
                            skip_if_exists=False)
    return len(stale)


def setup(cfg: DictConfig) -> Setup:
    """Load everything a study needs, once."""
    import torch

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    objectives = list(cfg.search.objectives)
    base, donors = resolve_models(cfg.models)
    engine = _setup_engine(cfg, base, donors)
    evaluator = _setup_evaluator(cfg, engine.processor)
    space = SearchSpace(to_dict(cfg.space), to_dict(cfg.merge), base, donors)
    study = _setup_study(cfg, objectives)
    from vlmexp.search.tracking import Tracker

    tracker = Tracker(tracking_uri=cfg.tracking.uri, experiment=str(cfg.tracking.experiment
                                                                    or cfg.study_name),
                      study_name=str(cfg.study_name))
    tracker.start(to_dict(cfg), objectives=objectives,
                  directions=["maximize"] * len(objectives))
    return Setup(cfg, engine, evaluator, space, study, tracker, objectives)


# ---------------------------------------------------------------------- one trial


class _Pruned(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _cumulative(evaluator: Any, parts: list[Any], objectives: Mapping[str, Mapping[str, float]]
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Objective values and task metrics over all items evaluated so far (rungs joined)."""
    per_task: dict[str, list[bool]] = {}
    metrics: dict[str, float] = {}
    for part in parts:
        for task, items in part.items.items():
            per_task.setdefault(task, []).extend(bool(i.correct) for i in items)
    for task, flags in per_task.items():
        metrics[f"{task}.{evaluator.tasks[task].primary_metric}"] = sum(flags) / len(flags)
    values: dict[str, float] = {}
    for obj, weights in objectives.items():
        present = {t: w for t, w in weights.items() if t in per_task}
        total = sum(present.values())
        if present and total > 0:
            values[obj] = sum(w * sum(per_task[t]) / len(per_task[t])
                              for t, w in present.items()) / total
    return values, metrics


def _rung_stops(fractions: Sequence[float]) -> list[float]:
    """The fractions of every task evaluated at each rung, ending with the whole (1.0)."""
    return sorted({float(f) for f in fractions if 0 < float(f) < 1}) + [1.0]


@dataclass
class History:
    """What this process has seen complete, for pruning decisions.

    `screen`: per rung, the objective values of complete trials (several objectives);
    `best_items`: (task, item index) → correct for the best complete trial (the paired test).
    """

    screen: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    complete: int = 0  # complete trials of the study (others' as of start-up, then ours)
    best_value: float | None = None
    best_items: dict[tuple[str, int], bool] = field(default_factory=dict)

    def add(self, record: Any, objectives: Sequence[str]) -> None:
        if record.state != "COMPLETE":
            return
        self.complete += 1
        if len(objectives) > 1:
            for rung, (_, at_rung) in enumerate(record.intermediate[:-1]):
                self.screen.setdefault(rung, []).append(dict(at_rung))
        value = record.values[objectives[0]]
        if len(objectives) == 1 and record.items and (self.best_value is None
                                                       or value > self.best_value):
            self.best_value = value
            self.best_items = {(task, int(i["index"])): bool(i["correct"])
                               for task, items in record.items.items() for i in items}


def paired_p_value(worse: int, better: int) -> float:
    """One-sided sign test: P(at least `worse` of `worse + better` discordant items go against
    the trial) when the trial and the reference are equally good.

    Example:
        >>> round(paired_p_value(8, 1), 4)
        0.0195
    """
    n = worse + better
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2 ** n


def run_trial(s: Setup, trial: optuna.Trial, history: History) -> Any:
    """Merge and evaluate one trial; returns a tracking record. Raises nothing but KeyboardInterrupt."""
    from vlmexp.search.tracking import TrialRecord

    cfg = s.cfg
    baseline = trial.user_attrs.get(BASELINE_ATTR)
    record = TrialRecord(number=trial.number, state="FAIL", recipe=None, values={}, metrics={},
                         intermediate=[], seconds={}, weights_digest=None, items=None,
                         baseline=baseline)
    t_start = time.perf_counter()
    parts: list[Any] = []
    try:
        recipe = s.space.suggest(trial)
        record.recipe = recipe
        record.params = dict(trial.params)
        applied = s.engine.apply(recipe)
        record.seconds["merge"] = applied.seconds
        record.weights_digest = applied.weights_digest
        trial.set_user_attr("weights_digest", applied.weights_digest)
        trial.set_user_attr("recipe_hash", recipe.content_hash())
        pruning = cfg.search.pruning
        stops = _rung_stops(pruning.rungs) if pruning.enabled and not baseline else [1.0]
        start = 0.0
        eval_seconds = 0.0
        for rung, stop in enumerate(stops):
            part = s.evaluator.evaluate(s.engine.model, fractions=(start, stop))
            eval_seconds += part.seconds.get("total", 0.0)
            parts.append(part)
            values, metrics = _cumulative(s.evaluator, parts, s.evaluator.objectives)
            done = sum(len(v) for p in parts for v in p.items.values())
            record.intermediate.append((done, {o: values[o] for o in s.objectives}))
            if stop == 1.0:
                break
            start = stop
            reason = _should_prune(s, trial, rung, done, values, parts, history)
            if reason:
                raise _Pruned(reason)
        record.seconds["eval"] = eval_seconds
        record.values = dict(values)  # every eval objective; the study is told its own
        record.metrics = metrics
        record.state = "COMPLETE"
    except _Pruned as pruned:
        record.state, record.reason = "PRUNED", pruned.reason
        record.seconds["eval"] = sum(p.seconds.get("total", 0.0) for p in parts)
        record.metrics = _cumulative(s.evaluator, parts, s.evaluator.objectives)[1]
    except (VlmexpError, RuntimeError, ValueError) as err:
        # a failed trial (NaN weights, out of memory, an evaluation error) is recorded; the study goes on
        record.state, record.reason = "FAIL", f"{type(err).__name__}: {' '.join(str(err).split())}"
        if not isinstance(err, (MergeError, EvalError)):
            traceback.print_exc(file=sys.stderr)
    record.seconds["total"] = time.perf_counter() - t_start
    if parts:
        record.items = _items_json(parts)
    return record


def _should_prune(s: Setup, trial: optuna.Trial, rung: int, done: int,
                  values: Mapping[str, float], parts: list[Any], history: History) -> str | None:
    pruning = s.cfg.search.pruning
    if len(s.objectives) == 1:
        trial.report(values[s.objectives[0]], step=rung)
    if history.complete < pruning.startup_trials:
        return None
    if len(s.objectives) == 1 and pruning.pruner == "paired":
        # the items scored so far against the same items of the best trial: prune when the
        # trial is significantly worse there (one-sided sign test)
        if not history.best_items:
            return None
        worse = better = 0
        for part in parts:
            for task, items in part.items.items():
                for item in items:
                    ref = history.best_items.get((task, int(item.index)))
                    if ref is None or ref == bool(item.correct):
                        continue
                    worse, better = (worse + 1, better) if ref else (worse, better + 1)
        p = paired_p_value(worse, better)
        if p < float(pruning.p_threshold):
            return (f"worse than the best on {worse} items, better on {better} after {done} "
                    f"items (sign test p={p:.3f})")
        return None
    if len(s.objectives) == 1:
        value = values[s.objectives[0]]
        if trial.should_prune():
            return f"{s.objectives[0]}={value:.3f} after {done} items (rung {rung}, {pruning.pruner})"
        return None
    # several objectives: stop a trial that a complete trial dominated at the same rung
    margin = float(pruning.margin)
    mine = [values[o] for o in s.objectives]
    for other in history.screen.get(rung, []):
        theirs = [other[o] for o in s.objectives]
        if all(t >= m + margin for t, m in zip(theirs, mine, strict=True)):
            return (f"dominated after {done} items: "
                    + ", ".join(f"{o}={v:.3f}" for o, v in zip(s.objectives, mine, strict=True)))
    return None


def _items_json(parts: list[Any]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for part in parts:
        for task, items in part.to_json()["items"].items():
            out.setdefault(task, []).extend(items)
    return out


def _pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    p = cfg.search.pruning
    if not p.enabled:
        return optuna.pruners.NopPruner()
    if p.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if p.pruner == "paired":  # decided in _should_prune from per-item results
        return optuna.pruners.NopPruner()
    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0)
    # maximising: a trial whose rung value is below the given percentile of the others' stops
    return optuna.pruners.PercentilePruner(100 - float(p.percentile), n_startup_trials=0,
                                           n_warmup_steps=0)


# ---------------------------------------------------------------------- the loop


@dataclass
class SearchResult:
    study_name: str
    best: list[Any]  # FrozenTrials: the best trial, or the Pareto front
    trials: int
    seconds: float
    test: dict[int, dict[str, float]] = field(default_factory=dict)
    baselines_test: dict[str, dict[str, float]] = field(default_factory=dict)
    parent_run_id: str | None = None


def run_search(cfg: DictConfig, *, progress: bool = True) -> SearchResult:
    """Run (or resume) the study `cfg` describes, up to `search.n_trials` trials in all."""
    t0 = time.perf_counter()
    s = setup(cfg)
    s.study.pruner = _pruner(cfg)
    recovered = recover_stale_trials(s.study)
    if recovered:
        print(f"resumed: {recovered} trial(s) left running by a crash marked failed and "
              f"enqueued again", file=sys.stderr)
    if cfg.search.baselines and not s.study.trials:
        for name, recipe in s.space.baselines():
            params = s.space.baseline_params(recipe)
            if params is None:
                print(f"baseline {name!r} is outside the search space; not enqueued",
                      file=sys.stderr)
                continue
            s.study.enqueue_trial(params, user_attrs={BASELINE_ATTR: name})
    target = int(cfg.search.n_trials)
    timeout = cfg.search.timeout
    done_states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    bar = _progress(target, len(s.study.get_trials(deepcopy=False, states=done_states)),
                    progress)
    history = History(complete=len(s.study.get_trials(deepcopy=False,
                                                      states=(TrialState.COMPLETE,))))
    try:
        while len(s.study.get_trials(deepcopy=False, states=done_states)) < target:
            if timeout is not None and time.perf_counter() - t0 > float(timeout):
                print(f"timeout: {timeout} s reached, no new trial started", file=sys.stderr)
                break
            trial = s.study.ask()
            record = run_trial(s, trial, history)
            _tell(s, trial, record)
            history.add(record, s.objectives)
            if not cfg.tracking.log_items:
                record.items = None
            s.tracker.log_trial(record)
            bar.update(1)
            bar.set_postfix_str(_postfix(s, record))
    finally:
        bar.close()
    best = _best(s)
    result = SearchResult(study_name=str(cfg.study_name), best=best,
                          trials=len(s.study.trials), seconds=time.perf_counter() - t0,
                          parent_run_id=getattr(s.tracker, "parent_run_id", None))
    if best and cfg.eval.test_tasks:
        result.test, result.baselines_test = _test_report(s, best)
    s.tracker.finish(s.study, best=None, test_results=result.test)
    s.tracker.close()
    return result


def _tell(s: Setup, trial: optuna.Trial, record: Any) -> None:
    if record.state == "COMPLETE":
        s.study.tell(trial, [record.values[o] for o in s.objectives])
    elif record.state == "PRUNED":
        trial.set_user_attr("reason", record.reason)
        s.study.tell(trial, state=TrialState.PRUNED)
    else:
        trial.set_user_attr("reason", record.reason)
        s.study.tell(trial, state=TrialState.FAIL)


def _best(s: Setup) -> list[Any]:
    complete = s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(s.objectives) == 1:
        return [s.study.best_trial]
    return list(s.study.best_trials)


def _test_report(s: Setup, best: list[Any]) -> tuple[dict[int, dict[str, float]],
                                                     dict[str, dict[str, float]]]:
    """Held-out scores of the best trial(s) and of the baselines."""
    evaluator = _setup_evaluator(s.cfg, s.engine.processor, test=True)
    tests: dict[int, dict[str, float]] = {}
    for t in best[:8]:
        recipe = s.space.recipe_from_params(t.params)
        s.engine.apply(recipe)
        res = evaluator.evaluate(s.engine.model)
        tests[t.number] = dict(res.objectives)
    baselines: dict[str, dict[str, float]] = {}
    for name, recipe in s.space.baselines():
        s.engine.apply(recipe)
        baselines[name] = dict(evaluator.evaluate(s.engine.model).objectives)
    s.engine.reset()
    return tests, baselines


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="trials", unit="trial", disable=not enabled,
                dynamic_ncols=True)


def _postfix(s: Setup, record: Any) -> str:
    complete = s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = len(s.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    if not complete:
        return f"last {record.state.lower()}"
    if len(s.objectives) == 1:
        best = s.study.best_trial
        return f"best {s.objectives[0]}={best.value:.3f} (#{best.number}), pruned {pruned}"
    return f"pareto front {len(s.study.best_trials)}, pruned {pruned}"
