"""The study loop: compose config → build space → ask → merge → evaluate → tell → log.

Everything heavy is set up once per process (`setup`): the models (the base live, the donors as
task vectors), the processor, the evaluator and its data, the Optuna study, the pruning
schedule and the MLflow tracker; each config group reaches the code it configures as that
code's arguments. Each trial then only merges in place and evaluates, in rungs when pruning is
on (`run_trial`).

Example:
    >>> from vlmexp.config import compose
    >>> result = run_search(compose(["search.n_trials=3"]))  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from vlmexp.errors import ConfigError, EvalError, MergeError, VlmexpError, one_line
from vlmexp.eval import EvalResult, Evaluator
from vlmexp.eval.evaluator import eval_config
from vlmexp.layout import Layout, align, discover
from vlmexp.merge.engine import MergeEngine, math_dtype_of
from vlmexp.merge.plan import parse_bytes, plan_memory
from vlmexp.merge.recipe import ModelRef
from vlmexp.search.pruning import Pruning
from vlmexp.search.samplers import make_sampler
from vlmexp.search.space import SearchSpace
from vlmexp.search.tracking import Tracker, TrialRecord

BASELINE_ATTR = "vlmexp.baseline"
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class Setup:
    """What a study holds for its whole life."""

    engine: MergeEngine
    evaluator: Evaluator
    space: SearchSpace
    study: optuna.Study
    pruning: Pruning
    tracker: Tracker
    objectives: list[str]
    directions: list[str]  # "maximize" / "minimize" per objective (Evaluator.directions)


# ---------------------------------------------------------------------- setup helpers


def resolve_models(models: Mapping[str, Any], *, progress: bool = True
                   ) -> tuple[ModelRef, list[ModelRef]]:
    """The base and donor references of the `models` node: `zoo:NAME` paths resolved to
    folders, hub ids to the commits they resolve to now (`checkpoint.resolve_model`; fetched
    when online), which every trial's recipe records."""
    from vlmexp.checkpoint import resolve_model
    from vlmexp.zoo import resolve_zoo

    zoo_dir = models.get("zoo_dir")
    allow_pickle = bool(models.get("allow_pickle", False))

    def ref(name: str, spec: str, **kw: Any) -> ModelRef:
        path = resolve_zoo(spec, zoo_dir, progress=progress)
        revision = resolve_model(path, allow_pickle=allow_pickle).revision
        return ModelRef(name, path, revision=revision, **kw)

    base = ref("base", str(models["base"]))
    donors = [ref(str(name), str(d["path"]), map=str(d.get("map", "auto")))
              for name, d in (models.get("donors") or {}).items()]
    if not donors:
        raise ConfigError("models.donors: name at least one donor")
    return base, donors


def preflight(base: ModelRef, donors: Sequence[ModelRef], *, vocab: str,
              trust_remote_code: bool = False
              ) -> tuple[Layout, dict[str, dict[str, int]], dict[str, int]]:
    """The base's layout, what each donor can change (component → tensors) and each donor's
    size in bytes, from the models' configs alone (no weight is read), so that a space that
    cannot work, or a merge that cannot fit, is refused before anything is loaded."""
    from vlmexp.checkpoint import model_skeleton
    from vlmexp.errors import AlignmentError

    opts = {"trust_remote_code": trust_remote_code}
    skeleton = model_skeleton(base.path, base.revision, **opts)
    layout = discover(skeleton)
    reach: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for d in donors:
        donor = model_skeleton(d.path, d.revision, **opts)
        sizes[d.name] = sum(p.numel() * p.element_size() for p in donor.parameters())
        try:
            alignment = align(skeleton, donor, vocab=vocab)
        except AlignmentError as err:
            raise ConfigError(f"models.donors.{d.name}: {err}") from None
        if d.map != "auto" and alignment.kind != d.map:
            raise ConfigError(f"models.donors.{d.name}.map: {d.map}, but {d.path} aligns with "
                              f"the base as {alignment.kind}")
        reach[d.name] = alignment.reach(layout)
    return layout, reach, sizes


def setup_engine(base: ModelRef, donors: Sequence[ModelRef], *, device: str, vocab: str,
                 dtype: str = "float32", components: Collection[str] | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False) -> MergeEngine:
    """The live base model with each donor's task vector (`merge.vocab`: the vocabulary policy;
    `merge.dtype`: the math dtype, which the task vectors are stored in as a recipe's
    `MergeEngine.from_recipe` stores them, so that `reproduce` rebuilds the same weights;
    `components`: what recipes may change, the only tensors the engine keeps copies of;
    `models.trust_remote_code`, `models.allow_pickle`: what `open_model` may run or unpickle)."""
    from vlmexp.checkpoint import open_model

    opts = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    engine = MergeEngine(open_model(base.path, revision=base.revision, **opts), device=device,
                         vocab=vocab, progress=True, components=components,
                         math_dtype=math_dtype_of(dtype))
    for d in donors:
        donor = open_model(d.path, revision=d.revision, load_processor=False, **opts)
        engine.add_donor(d.name, donor, map=d.map)
    if engine.processor is None:
        raise ConfigError(f"models.base: {base.path} has no processor/tokenizer files")
    return engine


def setup_evaluator(eval_node: Mapping[str, Any], processor: Any, *, device: str,
                    test: bool = False) -> Evaluator:
    """The evaluator of the `eval` node (validation tasks, or with `test` the held-out ones)."""
    return Evaluator.from_config(eval_config(eval_node, device=device, test=test), processor)


def setup_study(study_name: str, *, storage: str | None, sampler: str, seed: int,
                directions: Sequence[str], pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create or load the Optuna study (storage default: `default_storage()`), one direction
    ("maximize" / "minimize") per objective, as `Evaluator.directions()` gives them."""
    storage = storage or default_storage()
    try:
        study = optuna.create_study(
            study_name=study_name, storage=storage, load_if_exists=True,
            directions=list(directions), pruner=pruner,
            sampler=make_sampler(sampler, seed=seed, n_objectives=len(directions)))
    except ValueError as err:  # e.g. resuming with another number of objectives
        raise ConfigError(f"search.storage {storage}: study {study_name!r}: {err}") from None
    stored = [d.name.lower() for d in study.directions]
    if stored != list(directions):  # a loaded study keeps its own directions
        raise ConfigError(f"search.storage {storage}: study {study_name!r} was created with "
                          f"directions {stored}, its objectives now have {list(directions)}")
    return study


def default_storage() -> str:
    return "sqlite:///optuna.db"


def recover_stale_trials(study: optuna.Study) -> int:
    """Mark trials a crash left RUNNING as failed and enqueue their parameters again.

    Only for trials of this study that no live worker holds: callers run this once at start-up;
    with several workers sharing a study, start them after the previous run has ended.
    """
    stale = list(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs=dict(t.user_attrs),
                            skip_if_exists=False)
    return len(stale)


def setup(cfg: DictConfig) -> Setup:
    """Load everything a study needs, once; each config group goes to the code it configures."""
    import torch

    from vlmexp.checkpoint import resolve_device

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    node = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(node, dict)
    search = node["search"]
    objectives = list(search["objectives"])
    device = resolve_device(str(cfg.device))
    models = node["models"]
    base, donors = resolve_models(models)
    layout, reach, sizes = preflight(base, donors, vocab=node["merge"]["vocab"],
                                     trust_remote_code=models["trust_remote_code"])
    space = SearchSpace(node["space"], node["merge"], base, donors, layout=layout, reach=reach)
    budget = node["memory_budget"]
    plan = plan_memory(layout, reach, space.changed_components(), device=device,
                       donor_bytes=sizes, free_bytes=None if budget is None else parse_bytes(budget))
    plan.check()
    print(plan.describe(), file=sys.stderr)
    engine = setup_engine(base, donors, device=device, vocab=node["merge"]["vocab"],
                          dtype=node["merge"]["dtype"], components=space.changed_components(),
                          trust_remote_code=models["trust_remote_code"],
                          allow_pickle=models["allow_pickle"])
    evaluator = setup_evaluator(node["eval"], engine.processor, device=device)
    directions = [evaluator.directions()[o] for o in objectives]
    pruning = Pruning(objectives=objectives, directions=directions, **search["pruning"],
                      estimate=evaluator.estimate)  # what the subset screen reads
    study = setup_study(str(cfg.study_name), storage=search["storage"],
                        sampler=search["sampler"], seed=search["seed"], directions=directions,
                        pruner=pruning.optuna_pruner())
    tracking = node["tracking"]
    tracker = Tracker(tracking_uri=tracking["uri"], study_name=str(cfg.study_name),
                      experiment=tracking["experiment"] or str(cfg.study_name),
                      log_items=tracking["log_items"])
    tracker.start(node, objectives=objectives, directions=directions,
                  tasks=evaluator.identity())
    return Setup(engine, evaluator, space, study, pruning, tracker, objectives, directions)


# ---------------------------------------------------------------------- one trial


class _Pruned(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def run_trial(trial: optuna.Trial, space: SearchSpace, engine: MergeEngine,
              evaluator: Evaluator, pruning: Pruning) -> TrialRecord:
    """Merge and evaluate one trial: sampled weights → recipe → apply → evaluate by rungs.

    Returns the trial's record; raises nothing but KeyboardInterrupt (a failure is recorded).
    """
    baseline = trial.user_attrs.get(BASELINE_ATTR)
    record = TrialRecord(number=trial.number, state="FAIL", recipe=None, values={}, metrics={},
                         intermediate=[], seconds={}, weights_digest=None, items=None,
                         baseline=baseline)
    t_start = time.perf_counter()
    parts: list[EvalResult] = []
    try:
        recipe = space.suggest(trial)
        record.recipe, record.params = recipe, dict(trial.params)
        applied = engine.apply(recipe)
        record.seconds["merge"] = applied.seconds
        record.weights_digest = applied.weights_digest
        record.fingerprints = applied.fingerprints
        trial.set_user_attr("weights_digest", applied.weights_digest)
        trial.set_user_attr("recipe_hash", recipe.content_hash())
        start = 0.0
        for rung, stop in enumerate(pruning.stops(baseline=bool(baseline))):
            parts.append(evaluator.evaluate(engine.model, fractions=(start, stop)))
            values, record.metrics = evaluator.joined(parts)
            done = sum(len(v) for p in parts for v in p.items.values())
            record.intermediate.append((done, {o: values[o] for o in pruning.objectives}))
            if stop < 1.0:
                reason = pruning.decide(trial, rung, done, values, parts)
                if reason:
                    raise _Pruned(reason)
            start = stop
        record.values = dict(values)  # every eval objective; the study is told its own
        record.state = "COMPLETE"
    except _Pruned as pruned:
        record.state, record.reason = "PRUNED", pruned.reason
    except (VlmexpError, RuntimeError, ValueError) as err:
        # a failed trial (NaN weights, out of memory, an evaluation error) is recorded; the study goes on
        record.state, record.reason = "FAIL", f"{type(err).__name__}: {one_line(err)}"
        if not isinstance(err, (MergeError, EvalError)):
            traceback.print_exc(file=sys.stderr)
    if parts:
        record.seconds["eval"] = sum(p.seconds.get("total", 0.0) for p in parts)
        record.items = _items_json(parts)
    record.seconds["total"] = time.perf_counter() - t_start
    return record


def _items_json(parts: Sequence[EvalResult]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for part in parts:
        for task, items in part.to_json()["items"].items():
            out.setdefault(task, []).extend(items)
    return out


def tell(study: optuna.Study, trial: optuna.Trial, record: TrialRecord,
         objectives: Sequence[str]) -> None:
    """Report the trial's outcome to Optuna (the reason of a pruned or failed one as an attr)."""
    if record.state == "COMPLETE":
        study.tell(trial, [record.values[o] for o in objectives])
        return
    trial.set_user_attr("reason", record.reason)
    study.tell(trial, state=TrialState.PRUNED if record.state == "PRUNED" else TrialState.FAIL)


# ---------------------------------------------------------------------- the loop


@dataclass
class SearchResult:
    study_name: str
    best: list[FrozenTrial]  # the best trial, or the Pareto front
    trials: int
    seconds: float
    test: dict[int, dict[str, float]] = field(default_factory=dict)
    baselines_test: dict[str, dict[str, float]] = field(default_factory=dict)
    parent_run_id: str | None = None
    directions: dict[str, str] = field(default_factory=dict)  # objective -> maximize/minimize
    test_directions: dict[str, str] = field(default_factory=dict)  # the same, test objectives


def enqueue_baselines(study: optuna.Study, space: SearchSpace) -> None:
    """Enqueue the base, each donor alone and the uniform average (a new study only)."""
    if study.trials:
        return
    for name, recipe in space.baselines():
        params = space.baseline_params(recipe)
        if params is None:
            print(f"baseline {name!r} is outside the search space; not enqueued",
                  file=sys.stderr)
            continue
        study.enqueue_trial(params, user_attrs={BASELINE_ATTR: name})


def run_search(cfg: DictConfig, *, progress: bool = True) -> SearchResult:
    """Run (or resume) the study `cfg` describes, up to `search.n_trials` trials in all."""
    t0 = time.perf_counter()
    s = setup(cfg)
    recovered = recover_stale_trials(s.study)
    if recovered:
        print(f"resumed: {recovered} trial(s) left running by a crash marked failed and "
              f"enqueued again", file=sys.stderr)
    if cfg.search.baselines:
        enqueue_baselines(s.study, s.space)
    s.pruning.history.complete = len(s.study.get_trials(deepcopy=False,
                                                        states=(TrialState.COMPLETE,)))
    target, timeout = int(cfg.search.n_trials), cfg.search.timeout
    bar = _progress(target, _finished(s.study), progress)
    try:
        while _finished(s.study) < target:
            if timeout is not None and time.perf_counter() - t0 > float(timeout):
                print(f"timeout: {timeout} s reached, no new trial started", file=sys.stderr)
                break
            trial = s.study.ask()
            record = run_trial(trial, s.space, s.engine, s.evaluator, s.pruning)
            tell(s.study, trial, record, s.objectives)
            s.pruning.record(record)
            s.tracker.log_trial(record)
            bar.update(1)
            bar.set_postfix_str(_postfix(s.study, s.objectives, record))
    finally:
        bar.close()
    best = _best(s.study, s.objectives)
    result = SearchResult(study_name=str(cfg.study_name), best=best,
                          trials=len(s.study.trials), seconds=time.perf_counter() - t0,
                          parent_run_id=s.tracker.parent_run_id,
                          directions=dict(zip(s.objectives, s.directions, strict=True)))
    if best and cfg.eval.test_tasks:
        test_evaluator = setup_evaluator(OmegaConf.to_container(cfg.eval, resolve=True),
                                         s.engine.processor, device=s.engine.device, test=True)
        result.test_directions = test_evaluator.directions()
        result.test, result.baselines_test = test_report(best, s.space, s.engine,
                                                         test_evaluator)
    s.tracker.finish(s.study, test_results=result.test)
    s.tracker.close()
    return result


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE_STATES))


def _best(study: optuna.Study, objectives: Sequence[str]) -> list[FrozenTrial]:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return [study.best_trial] if len(objectives) == 1 else list(study.best_trials)


def test_report(best: Sequence[FrozenTrial], space: SearchSpace, engine: MergeEngine,
                evaluator: Evaluator) -> tuple[dict[int, dict[str, float]],
                                               dict[str, dict[str, float]]]:
    """Held-out scores of the best trial(s) (at most 8) and of the baselines."""
    tests: dict[int, dict[str, float]] = {}
    for t in best[:8]:
        engine.apply(space.recipe_from_params(t.params))
        tests[t.number] = dict(evaluator.evaluate(engine.model).objectives)
    baselines: dict[str, dict[str, float]] = {}
    for name, recipe in space.baselines():
        engine.apply(recipe)
        baselines[name] = dict(evaluator.evaluate(engine.model).objectives)
    engine.reset()
    return tests, baselines


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="trials", unit="trial", disable=not enabled,
                dynamic_ncols=True)


def _postfix(study: optuna.Study, objectives: Sequence[str], record: TrialRecord) -> str:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    if not complete:
        return f"last {record.state.lower()}"
    if len(objectives) == 1:  # Optuna's best: the lowest value where the study minimises
        best = study.best_trial
        return f"best {objectives[0]}={best.value:.3f} (#{best.number}), pruned {pruned}"
    return f"pareto front {len(study.best_trials)}, pruned {pruned}"
