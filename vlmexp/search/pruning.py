"""Pruning: evaluate a trial in rungs and stop it early when it is clearly not going to win.

A trial is evaluated on growing fractions of every task (`rungs`, then the whole). After each
rung, with one objective, Optuna's pruner (percentile, median, successive halving) compares the
running value with the complete trials at that rung, or the paired sign test compares the items
scored so far with the same items of the best complete trial, or (`subset`, MERGE³-style
screening) the full-set value estimated from the items so far, with its standard error
(`Evaluator.estimate`), is compared with the best complete trial's: a trial whose estimate plus
`z` standard errors is below it stops; with several objectives, a trial that a complete trial
dominated by `margin` at the same rung stops.

Every comparison follows each objective's direction (`directions`, from
`Evaluator.directions()`): a perplexity objective is minimised. Optuna's pruners read the
study's directions themselves.

`Pruning`'s constructor takes the `search.pruning` config node's keys as its arguments, and the
objectives and their directions.

Example:
    >>> p = Pruning(objectives=["combined"], rungs=[0.25, 0.5], pruner="median")
    >>> p.stops(baseline=False), p.stops(baseline=True)
    ([0.25, 0.5, 1.0], [1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:
    from vlmexp.eval.evaluator import EvalResult
    from vlmexp.search.tracking import TrialRecord


def _percentile(p: Pruning) -> optuna.pruners.BasePruner:
    # a trial whose rung value is worse than the given percentile of the others' stops (Optuna
    # reads "worse" from the study's direction)
    return optuna.pruners.PercentilePruner(100 - p.percentile, n_startup_trials=0,
                                           n_warmup_steps=0)


# The pruner choices (`search.pruning.pruner`): name → Optuna pruner. "paired" is decided here,
# from per-item results (`Pruning.decide`), so Optuna's own pruner does nothing.
PRUNERS: dict[str, Callable[[Pruning], optuna.pruners.BasePruner]] = {
    "percentile": _percentile,
    "median": lambda p: optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0),
    "halving": lambda p: optuna.pruners.SuccessiveHalvingPruner(min_resource=1,
                                                                reduction_factor=2),
    "paired": lambda p: optuna.pruners.NopPruner(),
    "subset": lambda p: optuna.pruners.NopPruner(),
}

# The full-set estimate of each objective, with its standard error, from a trial's rungs so far
# (`Evaluator.estimate`): what the subset screen reads.
Estimate = Callable[[Sequence["EvalResult"]], Mapping[str, tuple[float, float]]]


def paired_p_value(worse: int, better: int) -> float:
    """One-sided sign test (`scipy.stats.binomtest`): P(at least `worse` of `worse + better`
    discordant items go against the trial) when the trial and the reference are equally good.

    Example:
        >>> round(paired_p_value(8, 1), 4)
        0.0195
    """
    from scipy.stats import binomtest

    n = worse + better
    if n == 0:
        return 1.0
    return float(binomtest(worse, n, 0.5, alternative="greater").pvalue)


@dataclass
class History:
    """What this process has seen complete, for pruning decisions.

    `screen`: per rung, the objective values of complete trials (several objectives);
    `best_items`: (task, item index) → the item's value (`ItemScore.value`: 1.0 / 0.0 for right
    or wrong, an lm-eval per-sample score) for the best complete trial (the paired test).
    """

    complete: int = 0  # complete trials of the study (others' as of start-up, then ours)
    screen: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    best_value: float | None = None
    best_items: dict[tuple[str, int], float] = field(default_factory=dict)


class Pruning:
    """Rung schedule and pruning decisions of a study (see the module docstring).

    Args:
        objectives: the study's objectives, in order (the first decides with one objective).
        directions: "maximize" or "minimize" per objective, in the same order (default: all
            maximised).
        enabled: evaluate in rungs and prune; False evaluates every trial in full.
        rungs: fractions of every task evaluated before each decision, in (0, 1).
        pruner: one of `PRUNERS`.
        percentile: percentile pruner: stop a trial below this percentile at a rung.
        p_threshold: paired pruner: stop when the sign test against the best gives p below it.
        z: subset pruner: stop when the estimate plus `z` standard errors is below the best.
        startup_trials: complete trials before anything is pruned.
        margin: several objectives: how far a trial must be dominated at a rung.
        estimate: subset pruner: the full-set estimate with its standard error
            (`Evaluator.estimate`); without it the subset pruner stops nothing.
    """

    def __init__(self, *, objectives: Sequence[str], directions: Sequence[str] | None = None,
                 enabled: bool = True, rungs: Sequence[float] = (0.125, 0.25, 0.5),
                 pruner: str = "percentile", percentile: float = 65.0, p_threshold: float = 0.1,
                 startup_trials: int = 6, margin: float = 0.02, z: float = 1.0,
                 estimate: Estimate | None = None) -> None:
        self.objectives = list(objectives)
        self.directions = list(directions or ["maximize"] * len(self.objectives))
        if len(self.directions) != len(self.objectives) or not set(self.directions) <= {
                "maximize", "minimize"}:
            raise ValueError(f"directions {self.directions}: one of maximize, minimize per "
                             f"objective ({', '.join(self.objectives)})")
        # +1 where larger is better, -1 where smaller is: sign · value is always "higher is better"
        self.signs = [1.0 if d == "maximize" else -1.0 for d in self.directions]
        self.enabled = bool(enabled)
        self.rungs = sorted({float(r) for r in rungs if 0 < float(r) < 1})
        self.pruner = str(pruner)
        self.percentile = float(percentile)
        self.p_threshold = float(p_threshold)
        self.startup_trials = int(startup_trials)
        self.margin = float(margin)
        self.z = float(z)
        self.estimate = estimate
        self.history = History()

    def optuna_pruner(self) -> optuna.pruners.BasePruner:
        """The Optuna pruner that `trial.should_prune()` consults."""
        if not self.enabled:
            return optuna.pruners.NopPruner()
        return PRUNERS[self.pruner](self)

    def stops(self, *, baseline: bool) -> list[float]:
        """The fractions of every task evaluated at each rung, ending with the whole (1.0).

        Baselines are evaluated in full: they are the yardstick, never pruned.
        """
        return [*self.rungs, 1.0] if self.enabled and not baseline else [1.0]

    def decide(self, trial: optuna.Trial, rung: int, done: int, values: Mapping[str, float],
               parts: Sequence[EvalResult]) -> str | None:
        """After rung `rung` (`done` items so far, running objective `values`): why to stop the
        trial, or None to go on. Reports the running value to Optuna (one objective)."""
        single = len(self.objectives) == 1
        if single:
            trial.report(values[self.objectives[0]], step=rung)
        if self.history.complete < self.startup_trials:
            return None
        if single and self.pruner == "paired":
            return self._paired(done, parts)
        if single and self.pruner == "subset":
            return self._subset(done, parts)
        if single:
            if trial.should_prune():
                return (f"{self.objectives[0]}={values[self.objectives[0]]:.3f} after {done} "
                        f"items (rung {rung}, {self.pruner})")
            return None
        # several objectives: stop a trial that a complete trial dominated at the same rung
        mine = [values[o] for o in self.objectives]
        for other in self.history.screen.get(rung, []):
            theirs = [other[o] for o in self.objectives]
            if all(s * t >= s * m + self.margin
                   for s, t, m in zip(self.signs, theirs, mine, strict=True)):
                return (f"dominated after {done} items: " + ", ".join(
                    f"{o}={v:.3f}" for o, v in zip(self.objectives, mine, strict=True)))
        return None

    def _paired(self, done: int, parts: Sequence[EvalResult]) -> str | None:
        """The items scored so far against the same items of the best trial: stop when the
        trial is significantly worse there (one-sided sign test). Items without a value of
        their own (`ItemScore.value` None: a perplexity's documents) are not compared."""
        best = self.history.best_items
        if not best:
            return None
        sign = self.signs[0]
        worse = better = 0
        for part in parts:
            for task, items in part.items.items():
                for item in items:
                    ref = best.get((task, int(item.index)))
                    if ref is None or item.value is None or ref == item.value:
                        continue
                    worse, better = ((worse + 1, better) if sign * ref > sign * item.value
                                     else (worse, better + 1))
        p = paired_p_value(worse, better)
        if p < self.p_threshold:
            return (f"worse than the best on {worse} items, better on {better} after {done} "
                    f"items (sign test p={p:.3f})")
        return None

    def _subset(self, done: int, parts: Sequence[EvalResult]) -> str | None:
        """Screen on the items so far: stop when the full-set estimate plus `z` standard errors
        is worse than the best complete trial's value."""
        best = self.history.best_value
        found = self.estimate(parts).get(self.objectives[0]) if self.estimate else None
        if best is None or found is None:
            return None
        value, se = found
        sign = self.signs[0]
        if sign * value + self.z * se < sign * best:
            return (f"{self.objectives[0]}={value:.3f} ± {se:.3f} (estimated from {done} items) "
                    f"is more than {self.z:g} standard errors worse than the best, {best:.3f}")
        return None

    def record(self, record: TrialRecord) -> None:
        """Remember a finished trial (only complete ones count)."""
        if record.state != "COMPLETE":
            return
        h = self.history
        h.complete += 1
        if len(self.objectives) > 1:
            for rung, (_, at_rung) in enumerate(record.intermediate[:-1]):
                h.screen.setdefault(rung, []).append(dict(at_rung))
        value = record.values[self.objectives[0]]
        if len(self.objectives) == 1 and record.items and (
                h.best_value is None or self.signs[0] * value > self.signs[0] * h.best_value):
            h.best_value = value
            h.best_items = {(task, int(i["index"])): float(i["value"])
                            for task, items in record.items.items() for i in items
                            if i.get("value") is not None}
