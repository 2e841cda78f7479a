"""The study loop: compose config → build space → ask → merge → evaluate → tell → log.

Everything heavy is set up once per process (`setup`): the models (the base live, the donors as
task vectors), the processor, the evaluator and its data, the Optuna study, the pruning
schedule and the MLflow tracker; each config group reaches the code it configures as that
code's arguments. Each trial then only merges in place and evaluates, in rungs when pruning is
on (`run_trial`). Any number of such processes may share one study: each is a worker with its
own sampler seed, beats for the trial it runs, fails the trials of dead workers
(`vlmexp.search.workers`), and writes each record to disk before telling Optuna, from where it
reaches MLflow once (`vlmexp.search.outbox`).

Example:
    >>> from vlmexp.config import compose
    >>> result = run_search(compose(["search.n_trials=3"]))  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import re
import sys
import time
import traceback
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from vlmexp.errors import ConfigError, EvalError, MergeError, VlmexpError, one_line
from vlmexp.eval import EvalResult, Evaluator
from vlmexp.eval.evaluator import eval_config
from vlmexp.layout import Layout, align, discover
from vlmexp.merge.engine import MergeEngine, math_dtype_of
from vlmexp.merge.plan import donor_reading_bytes, parse_bytes, plan_memory
from vlmexp.merge.recipe import ModelRef
from vlmexp.search.mlflow_store import sqlite_file
from vlmexp.search.outbox import Outbox
from vlmexp.search.pruning import Pruning
from vlmexp.search.samplers import make_sampler
from vlmexp.search.space import SearchSpace
from vlmexp.search.tracking import Tracker, TrialRecord
from vlmexp.search.workers import (
    INTERRUPTED,
    LOST_RACE,
    OWNER,
    SEED,
    WORKER,
    Heartbeat,
    Worker,
    claim,
    create_sqlite_atomically,
    make_worker,
    recover_stale_trials,
)

BASELINE_ATTR = "vlmexp.baseline"
EVALUATED = (TrialState.COMPLETE, TrialState.PRUNED)
SETTLE_S = 0.5  # how long a claim waits for a concurrent writer (workers.claim)


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
    worker: Worker
    created: bool  # this process created the study
    outbox: Outbox  # trial records on their way to MLflow


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
              trust_remote_code: bool = False, allow_pickle: bool = False
              ) -> tuple[Layout, dict[str, dict[str, int]], dict[str, int]]:
    """The base's layout, what each donor can change (component → tensors) and what each donor
    holds while it is read (`merge.plan.donor_reading_bytes`), from the models' configs and
    safetensors headers alone (no weight is read), so that a space that
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
        sizes[d.name] = donor_reading_bytes(d.path, d.revision, allow_pickle=allow_pickle,
                                            **opts)
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
                 vectors_on: str = "device", pristine_on: str = "device",
                 progress: bool = True, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> MergeEngine:
    """The live base model with each donor's task vector (`merge.vocab`: the vocabulary policy;
    `merge.dtype`: the recipes' math dtype; task vectors are stored in the model's own dtype,
    as `MergeEngine.from_recipe` stores them, so that `reproduce` rebuilds the same weights;
    donors are read tensor by tensor where they can be; `components`: what recipes may change,
    the only tensors the engine keeps copies of; `vectors_on`, `pristine_on`: the memory
    plan's placements (`memory_placement`); `models.trust_remote_code`,
    `models.allow_pickle`: what `open_model` may run or unpickle)."""
    from vlmexp.checkpoint import open_model

    opts = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    engine = MergeEngine(open_model(base.path, revision=base.revision, **opts), device=device,
                         vocab=vocab, progress=progress, components=components,
                         math_dtype=math_dtype_of(dtype), vectors_on=vectors_on,
                         pristine_on=pristine_on)
    for d in donors:
        engine.add_donor(d.name, d.path, revision=d.revision, map=d.map, progress=progress,
                         **opts)
    if engine.processor is None:
        raise ConfigError(f"models.base: {base.path} has no processor/tokenizer files")
    return engine


def setup_evaluator(eval_node: Mapping[str, Any], processor: Any, *, device: str,
                    test: bool = False) -> Evaluator:
    """The evaluator of the `eval` node (validation tasks, or with `test` the held-out ones)."""
    return Evaluator.from_config(eval_config(eval_node, device=device, test=test), processor)


def setup_study(study_name: str, *, storage: str | optuna.storages.BaseStorage | None,
                sampler: str, seed: int, directions: Sequence[str],
                pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create or load the Optuna study (storage default: `default_storage()`), one direction
    ("maximize" / "minimize") per objective, as `Evaluator.directions()` gives them."""
    return create_or_load_study(study_name, storage=storage, sampler=sampler, seed=seed,
                                directions=directions, pruner=pruner)[0]


def create_or_load_study(study_name: str, *, storage: str | optuna.storages.BaseStorage | None,
                         sampler: str, seed: int, directions: Sequence[str],
                         pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, bool]:
    """The study and whether this process created it: of several workers started together,
    exactly one creates it (the storage refuses a second study of the same name)."""
    if not isinstance(storage, optuna.storages.BaseStorage):
        storage = open_storage(storage)
    where = f"search.storage {_shown(storage)}"
    make = make_sampler(sampler, seed=seed, n_objectives=len(directions))
    try:
        study = optuna.create_study(study_name=study_name, storage=storage,
                                    directions=list(directions), pruner=pruner, sampler=make)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner,
                                  sampler=make)
        created = False
    except ValueError as err:  # e.g. resuming with another number of objectives
        raise ConfigError(f"{where}: study {study_name!r}: {err}") from None
    stored = [d.name.lower() for d in study.directions]
    if stored != list(directions):  # a loaded study keeps its own directions
        raise ConfigError(f"{where}: study {study_name!r} was created with "
                          f"directions {stored}, its objectives now have {list(directions)}")
    return study, created


def default_storage() -> str:
    return "sqlite:///optuna.db"


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """Optuna's storage at `url` (`journal:PATH` for a journal file), its tables created;
    ConfigError, one line, when it cannot be opened (unreachable server, missing driver)."""
    url = url or default_storage()
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(url[len("journal:"):].removeprefix("//")))
        return _rdb_storage(url)
    except Exception as err:  # noqa: BLE001 - sqlalchemy, driver and OS errors alike
        cause = _root_cause(err)
        if isinstance(cause, ModuleNotFoundError):
            hint = " (pip install 'psycopg[binary]')" if url.startswith("postgres") else ""
            raise ConfigError(f"search.storage {_shown(url)}: its driver {cause.name!r} is not "
                              f"installed{hint}") from None
        raise ConfigError(f"search.storage {_shown(url)}: cannot open it: "
                          f"{one_line(cause, 300)}") from None


def _rdb_storage(url: str) -> optuna.storages.BaseStorage:
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgres"):
        kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds
    path = sqlite_file(url)
    if path is not None:
        create_sqlite_atomically(path, lambda tmp: RDBStorage(tmp).engine.dispose())
    for attempt in range(6):
        try:
            return _CachedStorage(RDBStorage(url, engine_kwargs=kwargs))
        except Exception as err:
            # two workers creating the tables of a new SQLite file at once: the second retries
            if "already exists" not in str(_root_cause(err)) or attempt == 5:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _shown(storage: str | optuna.storages.BaseStorage | None) -> str:
    """A storage URL without its password."""
    if storage is None:
        return default_storage()
    if not isinstance(storage, str):
        url = getattr(getattr(storage, "_backend", storage), "url", None)
        return _shown(url) if isinstance(url, str) else type(storage).__name__
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", storage)


def setup(cfg: DictConfig, *, progress: bool = True) -> Setup:
    """Load everything a study needs, once; each config group goes to the code it configures
    (`progress`: progress bars while models load)."""
    import torch

    from vlmexp.checkpoint import resolve_device

    if not progress:  # transformers' own "Loading weights" bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
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
                                     trust_remote_code=models["trust_remote_code"],
                                     allow_pickle=models["allow_pickle"])
    space = SearchSpace(node["space"], node["merge"], base, donors, layout=layout, reach=reach)
    budget = node["memory_budget"]
    plan = plan_memory(layout, reach, space.changed_components(), device=device,
                       donor_bytes=sizes, free_bytes=None if budget is None else parse_bytes(budget),
                       placement=node["memory_placement"])
    plan.check()  # before the storage is opened: a refused study writes nothing
    storage = open_storage(search["storage"])  # an unreachable storage: one line, at once
    print(plan.describe(), file=sys.stderr)
    engine = setup_engine(base, donors, device=device, vocab=node["merge"]["vocab"],
                          dtype=node["merge"]["dtype"], components=space.changed_components(),
                          vectors_on=plan.vectors_on, pristine_on=plan.pristine_on,
                          progress=progress, trust_remote_code=models["trust_remote_code"],
                          allow_pickle=models["allow_pickle"])
    evaluator = setup_evaluator(node["eval"], engine.processor, device=device)
    directions = [evaluator.directions()[o] for o in objectives]
    pruning = Pruning(objectives=objectives, directions=directions, **search["pruning"],
                      estimate=evaluator.estimate)  # what the subset screen reads
    study, created = create_or_load_study(
        str(cfg.study_name), storage=storage, sampler=search["sampler"], seed=search["seed"],
        directions=directions, pruner=pruning.optuna_pruner())
    worker = make_worker(int(search["seed"]), search["worker_id"], created=created)
    # each worker samples with its own seed (one sampler for its whole life)
    study.sampler = make_sampler(search["sampler"], seed=worker.seed,
                                 n_objectives=len(directions))
    if search["baselines"]:
        enqueue_baselines(study, space, created=created)
    tracking = node["tracking"]
    tracker = Tracker(tracking_uri=tracking["uri"], study_name=str(cfg.study_name),
                      experiment=tracking["experiment"] or str(cfg.study_name),
                      log_items=tracking["log_items"], lazy=True)
    tasks = evaluator.identity()

    def start() -> None:
        tracker.start(node, objectives=objectives, directions=directions, tasks=tasks,
                      workers={worker.id: worker.seed})

    outbox = Outbox(queue_folder(tracking["queue"], str(cfg.study_name)), tracker, start)
    return Setup(engine, evaluator, space, study, pruning, tracker, objectives, directions,
                 worker, created, outbox)


def queue_folder(queue: str | None, study_name: str) -> Path:
    """Where this study's trial records wait for MLflow (`tracking.queue`)."""
    if queue:
        return Path(queue)
    return Path(".vlmexp_cache") / "pending" / re.sub(r"[^\w.\-]", "_", study_name)


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
    if record.state == "FAIL":
        _release_memory(engine.device)
    if parts:
        record.seconds["eval"] = sum(p.seconds.get("total", 0.0) for p in parts)
        record.items = _items_json(parts)
    record.seconds["total"] = time.perf_counter() - t_start
    return record


def _release_memory(device: Any) -> None:
    """What a failed trial held (its traceback's frames, a half-built batch) goes now, so
    memory does not grow over failed trials; on a GPU the cache is returned too (an OOM)."""
    import torch

    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _items_json(parts: Sequence[EvalResult]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for part in parts:
        for task, items in part.to_json()["items"].items():
            out.setdefault(task, []).extend(items)
    return out


def tell(study: optuna.Study, trial: optuna.Trial | FrozenTrial, record: TrialRecord,
         objectives: Sequence[str]) -> None:
    """Report the trial's outcome to Optuna (the reason of a pruned or failed one as an attr)."""
    if record.state == "COMPLETE":
        study.tell(trial.number, [record.values[o] for o in objectives])
        return
    study._storage.set_trial_user_attr(trial._trial_id, "reason", record.reason)
    study.tell(trial.number,
               state=TrialState.PRUNED if record.state == "PRUNED" else TrialState.FAIL)


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


def enqueue_baselines(study: optuna.Study, space: SearchSpace, *, created: bool = True) -> None:
    """Enqueue the base, each donor alone and the uniform average, once per study: by the
    worker that created it (of several started together, exactly one did), right away."""
    if not created or study.trials:
        return
    for name, recipe in space.baselines():
        params = space.baseline_params(recipe)
        if params is None:
            print(f"baseline {name!r} is outside the search space; not enqueued",
                  file=sys.stderr)
            continue
        study.enqueue_trial(params, user_attrs={BASELINE_ATTR: name})


def run_search(cfg: DictConfig, *, progress: bool = True) -> SearchResult:
    """Run (or resume) the study `cfg` describes, until `search.n_trials` trials are evaluated
    (complete or pruned) in all, by this worker and any other on the same study."""
    t0 = time.perf_counter()
    s = setup(cfg, progress=progress)
    search = cfg.search
    print(f"worker {s.worker.id} (sampler seed {s.worker.seed}) on study {cfg.study_name!r}"
          + (" (created)" if s.created else ""), file=sys.stderr)
    _recover(s, float(search.grace))
    s.outbox.flush(_trials(s.study))  # records a crash or an outage left behind
    s.pruning.history.complete = len(s.study.get_trials(deepcopy=False,
                                                        states=(TrialState.COMPLETE,)))
    target, timeout = int(search.n_trials), search.timeout
    bar = _progress(target, _count(s.study)["evaluated"], progress)
    try:
        while True:
            _recover(s, float(search.grace))
            count = _count(s.study)
            bar.n = min(count["evaluated"], target)
            bar.refresh()
            if count["evaluated"] >= target:
                break
            if count["failed"] >= target:
                print(f"{count['failed']} trials failed on their own (search.n_trials is "
                      f"{target}): no new trial started", file=sys.stderr)
                break
            if timeout is not None and time.perf_counter() - t0 > float(timeout):
                print(f"timeout: {timeout} s reached, no new trial started", file=sys.stderr)
                break
            if count["evaluated"] + count["running"] >= target:
                # other workers run the last trials: wait for them (one may fail or die)
                time.sleep(min(1.0, float(search.heartbeat)))
                continue
            record = _one_trial(s, float(search.heartbeat))
            if record is not None:
                bar.set_postfix_str(_postfix(s.study, s.objectives, record))
    finally:
        bar.close()
    best = _best(s.study, s.objectives)
    result = SearchResult(study_name=str(cfg.study_name), best=best,
                          trials=len(s.study.trials), seconds=time.perf_counter() - t0,
                          directions=dict(zip(s.objectives, s.directions, strict=True)))
    if best and cfg.eval.test_tasks:
        test_evaluator = setup_evaluator(OmegaConf.to_container(cfg.eval, resolve=True),
                                         s.engine.processor, device=s.engine.device, test=True)
        result.test_directions = test_evaluator.directions()
        result.test, result.baselines_test = test_report(best, s.space, s.engine,
                                                         test_evaluator)
    _finish_tracking(s, result, wait=float(cfg.tracking.wait))
    result.parent_run_id = s.tracker.parent_run_id
    return result


def _one_trial(s: Setup, heartbeat: float) -> TrialRecord | None:
    """Ask, run, record on disk, tell, send: one trial of this worker (None if another
    worker popped the same enqueued trial and keeps it)."""
    storage = s.study._storage
    trial = s.study.ask()
    # beats from the start: a worker killed now is known gone at once on this host
    with Heartbeat(storage, trial._trial_id, s.worker, interval=heartbeat):
        # on SQLite two workers can pop one enqueued trial: the last to claim it runs it
        if "fixed_params" in storage.get_trial(trial._trial_id).system_attrs and not claim(
                storage, trial._trial_id, OWNER, s.worker.token, settle=SETTLE_S):
            return None
        trial.set_user_attr(WORKER, s.worker.id)
        trial.set_user_attr(SEED, s.worker.seed)
        record = run_trial(trial, s.space, s.engine, s.evaluator, s.pruning)
        record.tags = {WORKER: s.worker.id, SEED: str(s.worker.seed)}
        s.outbox.put(record)  # on disk before Optuna knows: a crash from here loses nothing
        try:
            tell(s.study, trial, record, s.objectives)
        except LOST_RACE as err:
            held = storage.get_trial(trial._trial_id)
            if held.state == TrialState.RUNNING:
                raise
            print(f"trial {trial.number}: another worker finished it first ({held.state.name}: "
                  f"{held.user_attrs.get(INTERRUPTED, one_line(err))}); this worker's result "
                  f"is logged as that", file=sys.stderr)
    s.pruning.record(record)
    s.outbox.flush(_trials(s.study))
    return record


def _recover(s: Setup, grace: float) -> None:
    """Fail the trials of dead workers (their records, if one waits here, finish them)."""

    def finish(trial: FrozenTrial) -> bool:
        record = s.outbox.get(trial.number)
        if record is None:
            return False
        try:
            tell(s.study, trial, record, s.objectives)
        except LOST_RACE:
            return True  # finished by another worker meanwhile
        print(f"trial {trial.number}: its worker died after recording it; told from its "
              f"record", file=sys.stderr)
        return True

    failed = recover_stale_trials(s.study, s.worker, grace=grace, settle=SETTLE_S,
                                  finish=finish)
    for trial, reason in failed:
        s.outbox.put(interrupted_record(trial, reason, s.space))
    if failed:
        s.outbox.flush(_trials(s.study))


def interrupted_record(trial: FrozenTrial, reason: str, space: SearchSpace) -> TrialRecord:
    """The FAIL record of a trial whose worker died: its recipe, as far as it was sampled."""
    params = {**(trial.system_attrs.get("fixed_params") or {}), **trial.params}
    try:
        recipe = space.recipe_from_params(params)
    except Exception:  # noqa: BLE001 - killed before it sampled every parameter
        recipe = None
    tags = {k: str(trial.user_attrs[k]) for k in (WORKER, SEED) if k in trial.user_attrs}
    return TrialRecord(number=trial.number, state="FAIL", recipe=recipe, values={}, metrics={},
                       intermediate=[], seconds={},
                       weights_digest=trial.user_attrs.get("weights_digest"), items=None,
                       reason=f"interrupted: {reason}",
                       baseline=trial.user_attrs.get(BASELINE_ATTR),
                       params=params, tags=tags)


def _finish_tracking(s: Setup, result: SearchResult, *, wait: float) -> None:
    """Send what waits (for up to `wait` s while the server is down), then the study's tables
    and plots; a tracking server still down leaves the records queued, with a message."""
    deadline = time.monotonic() + wait
    s.outbox.flush(_trials(s.study), force=True)
    while s.outbox.outage is not None and time.monotonic() < deadline:
        time.sleep(2.0)
        s.outbox.flush(_trials(s.study), force=True)
    if s.outbox.outage is not None:
        left = len(s.outbox.pending())
        print(f"{left} trial record(s) could not be sent to MLflow ({s.tracker.tracking_uri}); "
              f"they wait in {s.outbox.folder} and are sent by the next run of this study",
              file=sys.stderr)
        return
    from vlmexp.errors import TrackingError

    try:
        s.tracker.finish(s.study, test_results=result.test)
        s.tracker.close()
    except TrackingError as err:
        print(f"MLflow: the study's tables and plots were not logged: {err}", file=sys.stderr)


def _trials(study: optuna.Study) -> dict[int, FrozenTrial]:
    return {t.number: t for t in study.get_trials(deepcopy=False)}


def _count(study: optuna.Study) -> dict[str, int]:
    """Trials evaluated (complete, pruned), failed on their own, and running, in all workers."""
    trials = study.get_trials(deepcopy=False)
    return {
        "evaluated": sum(t.state in EVALUATED for t in trials),
        "failed": sum(t.state == TrialState.FAIL and INTERRUPTED not in t.user_attrs
                      for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
    }


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
