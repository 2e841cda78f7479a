"""The search configuration: structured configs that validate what Hydra composes from `conf/`.

`compose(overrides)` reads `conf/config.yaml` and its groups with Hydra's compose API (argparse
owns the subcommand, Hydra the `key=value` overrides), then merges the result into the
`SearchConfig` schema below, so a typo in a key or a wrong type is a one-line ConfigError.
Each group mirrors the code it configures: `models` → checkpoint loading, `merge` → the recipe's
method and parameters, `space` → `vlmexp.search.space`, `search` → the study loop,
`eval` → `vlmexp.eval.Evaluator.from_config`, `tracking` → `vlmexp.search.tracking.Tracker`.

Example:
    >>> cfg = compose(["search.n_trials=5"])
    >>> cfg.search.n_trials, cfg.merge.method
    (5, 'task_arithmetic')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlmexp.errors import ConfigError, one_line
from vlmexp.paths import CONF_DIR


@dataclass
class DonorConfig:
    path: str = "???"
    map: str = "auto"  # auto | same | llm_to_vlm


@dataclass
class ModelsConfig:
    # a folder, a hub id (org/name or org/name@revision, through the Hugging Face cache), or
    # zoo:NAME (the demo zoo, built on first use)
    base: str = "???"
    donors: dict[str, DonorConfig] = field(default_factory=dict)
    zoo_dir: str | None = None  # where the demo zoo is cached (default .vlmexp_cache/zoo)
    trust_remote_code: bool = False  # run modeling code a checkpoint ships (off: refuse it)
    allow_pickle: bool = False  # open pickle-only (.bin) checkpoints, which can run code


@dataclass
class MergeConfig:
    method: str = "task_arithmetic"
    parameters: dict[str, Any] = field(default_factory=dict)  # fixed method-level parameters
    dtype: str = "float32"
    seed: int = 0
    vocab: str = "error"  # one of vlmexp.layout.VOCAB_POLICIES


@dataclass
class SpaceConfig:
    # component -> donor -> parameter -> [low, high] (searched) or a value (fixed)
    components: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)  # method-level: [low, high] or value
    knots: dict[str, int] = field(default_factory=dict)  # component -> K knots over depth
    methods: list[str] = field(default_factory=list)  # a choice of methods (empty: merge.method)
    pin: list[str] = field(default_factory=list)  # components kept as the base's
    take: dict[str, str] = field(default_factory=dict)  # component -> donor, copied verbatim
    tie: list[list[str]] = field(default_factory=list)  # groups sharing one value per donor
    shared: bool = False  # one value per donor and parameter for all components (a global merge)


@dataclass
class PruningConfig:
    enabled: bool = True
    rungs: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])  # fractions evaluated first
    pruner: str = "percentile"  # a key of vlmexp.search.pruning.PRUNERS
    percentile: float = 65.0  # percentile pruner: stop a trial below this percentile at a rung
    p_threshold: float = 0.1  # paired pruner: stop when a sign test against the best gives p below
    z: float = 1.0  # subset pruner: stop when the estimate + z standard errors is below the best
    startup_trials: int = 6  # complete trials before anything is pruned
    margin: float = 0.02  # several objectives: how far a trial must be dominated at a rung


@dataclass
class StudyConfig:
    sampler: str = "tpe"  # a key of vlmexp.search.samplers.SAMPLERS
    n_trials: int = 40  # trials in the study in all (a resumed study runs up to this count)
    timeout: float | None = None  # seconds; no new trial starts after it
    objectives: list[str] = field(default_factory=lambda: ["combined"])  # directions: Evaluator
    baselines: bool = True  # enqueue base, each donor alone and the uniform average first
    storage: str | None = None  # Optuna storage URL (or journal:PATH); default sqlite:///optuna.db
    seed: int = 0
    pruning: PruningConfig = field(default_factory=PruningConfig)
    worker_id: str | None = None  # default $VLMEXP_WORKER_ID, else "0" / host-pid (workers.py)
    heartbeat: float = 15.0  # seconds between a running trial's heartbeats
    grace: float = 120.0  # a running trial whose heartbeat is older is failed and run again


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)  # task YAMLs (or folders), relative to the project
    objectives: dict[str, dict[str, float]] = field(default_factory=dict)
    test_tasks: list[str] = field(default_factory=list)  # held-out tasks for the final report
    test_objectives: dict[str, dict[str, float]] = field(default_factory=dict)
    batch_size: int = 16
    objective: str = "labelled"  # labelled | unsupervised (vlmexp.eval.evaluator.OBJECTIVE_KINDS)


@dataclass
class TrackingConfig:
    uri: str | None = None  # default vlmexp.search.mlflow_store.DEFAULT_URI (the working directory)
    experiment: str | None = None  # default: the study name
    log_items: bool = True
    queue: str | None = None  # where records wait for MLflow; default .vlmexp_cache/pending/<study>
    wait: float = 60.0  # seconds the end of a study waits for a tracking server that is down


@dataclass
class SearchConfig:
    study_name: str = "demo"
    device: str = "auto"
    threads: int | None = None  # torch threads (None: torch's default)
    memory_budget: str | None = None  # what the merge engine may use, e.g. 20GiB (None: free now)
    memory_placement: str = "auto"  # GPU: where task vectors and base copies live (merge.plan)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    search: StudyConfig = field(default_factory=StudyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def compose(overrides: list[str] | None = None, *, config_dir: str | Path | None = None,
            config_name: str = "config") -> DictConfig:
    """Compose `conf/` with `overrides` and validate it against `SearchConfig`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf = Path(config_dir) if config_dir else CONF_DIR
    if not conf.is_dir():
        raise ConfigError(f"{conf}: no such config folder")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf.resolve()), version_base=None):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_omegaconf_line(err)) from None
    finally:
        GlobalHydra.instance().clear()
    return validate(raw)


def validate(raw: Any) -> DictConfig:
    """Merge a raw config into the schema: unknown keys and wrong types are ConfigErrors."""
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(SearchConfig)
    try:
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_line(err)) from None
    _check_choices(cfg)
    return cfg


def _check_choices(cfg: DictConfig) -> None:
    # each choice list lives with the code that acts on it
    from vlmexp.eval.evaluator import OBJECTIVE_KINDS
    from vlmexp.layout import VOCAB_POLICIES
    from vlmexp.merge.methods import METHODS
    from vlmexp.merge.plan import PLACEMENTS, parse_bytes
    from vlmexp.merge.recipe import DTYPES, MAPS
    from vlmexp.search.pruning import PRUNERS
    from vlmexp.search.samplers import SAMPLERS

    choices = {
        "search.sampler": (cfg.search.sampler, tuple(SAMPLERS)),
        "search.pruning.pruner": (cfg.search.pruning.pruner, tuple(PRUNERS)),
        "merge.vocab": (cfg.merge.vocab, VOCAB_POLICIES),
        "merge.method": (cfg.merge.method, tuple(METHODS)),
        "merge.dtype": (cfg.merge.dtype, DTYPES),
        "eval.objective": (cfg.eval.objective, OBJECTIVE_KINDS),
        "memory_placement": (cfg.memory_placement, PLACEMENTS),
    }
    choices.update({f"models.donors.{name}.map": (d.map, MAPS)
                    for name, d in cfg.models.donors.items()})
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    if cfg.memory_budget is not None:
        parse_bytes(cfg.memory_budget)  # a ConfigError naming memory_budget
    if not 0 < cfg.search.heartbeat < cfg.search.grace:
        raise ConfigError(f"search.heartbeat: {cfg.search.heartbeat} s must be above 0 and "
                          f"below search.grace ({cfg.search.grace} s)")
    if cfg.search.n_trials < 1:
        raise ConfigError(f"search.n_trials: must be at least 1, got {cfg.search.n_trials}")
    if not cfg.search.objectives:
        raise ConfigError("search.objectives: name at least one objective")
    for name in cfg.search.objectives:
        if name not in cfg.eval.objectives:
            raise ConfigError(f"search.objectives: {name!r} is not an objective of eval "
                              f"(eval.objectives: {', '.join(cfg.eval.objectives) or 'none'})")
    for r in cfg.search.pruning.rungs:
        if not 0 < r < 1:
            raise ConfigError(f"search.pruning.rungs: {r} is not a fraction in (0, 1)")
    if cfg.search.pruning.pruner in ("paired", "subset") and len(cfg.search.objectives) > 1:
        raise ConfigError(f"search.pruning.pruner: {cfg.search.pruning.pruner} compares one "
                          "objective with the best trial's; with several objectives a trial is pruned when dominated "
                          "(set search.pruning.margin) and the pruner has no effect")
    if cfg.eval.objective == "unsupervised" and cfg.search.pruning.pruner == "paired":
        raise ConfigError("search.pruning.pruner: paired compares items' scores against the "
                          "answers, which eval.objective=unsupervised does not read; use "
                          "percentile or subset")
    check_device(str(cfg.device), key="device")


def check_device(device: str, *, key: str) -> None:
    """ConfigError unless `device` is auto, cpu or an available cuda device."""
    import re

    import torch

    if device in ("auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ConfigError(f"{key}: {device!r} is not auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: {device} is not available on this machine (no CUDA device)")


def _omegaconf_line(err: BaseException) -> str:
    text = one_line(err)
    # Hydra suggests "+key=value" for a key the config lacks; the schema refuses that too
    unknown = re.match(r"Could not override '([^']+)'\. To append to your config use \+", text)
    if unknown:
        return f"{unknown.group(1)}: no such key in the config (a typo?)"
    # "Could not load 'space/globl'" comes with Hydra's whole search path: keep the first line
    missing = re.match(r"In '[^']+': Could not find '([^']+)'", text) or re.match(
        r"Could not load '([^']+)'", text)
    if missing:
        group, _, name = missing.group(1).partition("/")
        return f"{group}={name}: no such config in conf/{group}/" if name else text
    # OmegaConf appends "full_key: KEY reference_type=... object_type=..."; lead with the key
    if " full_key:" in text:
        message, trailer = text.split(" full_key:", 1)
        key = trailer.split()[0] if trailer.split() else ""
        return f"{key}: {message}" if key else message
    return text


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved dict of the config (for logging)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
