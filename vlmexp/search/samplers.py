"""The sampler choices (`search.sampler`): name → Optuna sampler, one table.

Example:
    >>> type(make_sampler("random", seed=0, n_objectives=1)).__name__
    'RandomSampler'
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from vlmexp.errors import ConfigError


def _cmaes(seed: int, n_objectives: int) -> optuna.samplers.BaseSampler:
    if n_objectives > 1:
        raise ConfigError("search.sampler: cmaes optimises one objective; use nsga2 or tpe")
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


# name → factory(seed, number of objectives)
SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, n: optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                                      n_startup_trials=8),
    "cmaes": _cmaes,
    "gp": lambda seed, n: optuna.samplers.GPSampler(seed=seed),
    "nsga2": lambda seed, n: optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
    "random": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
}


def make_sampler(name: str, *, seed: int, n_objectives: int) -> optuna.samplers.BaseSampler:
    """The sampler `name` (a key of `SAMPLERS`) seeded with `seed`."""
    if name not in SAMPLERS:
        raise ConfigError(f"search.sampler: {name!r} is not one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](int(seed), int(n_objectives))
