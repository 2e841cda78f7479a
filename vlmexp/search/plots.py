"""Study plots: data in, matplotlib `Figure` out (Agg, no pyplot state; never plotly).

Each function is pure: it reads plain numbers (or a Recipe) and returns a Figure that the caller
saves or logs (`Tracker.finish` logs them as PNG artifacts of the study's parent run).

Example:
    >>> fig = history_figure([0, 1, 2], {"acc": [0.2, 0.5, 0.4]}, ["maximize"])
    >>> fig.axes[0].get_title()
    'acc'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from vlmexp.merge.recipe import Recipe

_DEPTHS = [i / 100 for i in range(101)]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def history_figure(numbers: Sequence[int], values: Mapping[str, Sequence[float | None]],
                   directions: Sequence[str]) -> Figure:
    """Objective value per trial (dots) and the best so far (step line), one panel per objective.

    Args:
        numbers: trial numbers, in order.
        values: objective name -> value per trial (None for a pruned or failed trial).
        directions: "maximize" / "minimize" per objective, in the order of `values`.
    """
    names = list(values)
    fig = Figure(figsize=(6.4, 3.2 * max(1, len(names))), layout="constrained")
    for i, (name, direction) in enumerate(zip(names, directions, strict=True)):
        ax = fig.add_subplot(len(names), 1, i + 1)
        pts = [(n, v) for n, v in zip(numbers, values[name], strict=True) if _finite(v)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=14, color="tab:blue", label="trial")
            best: list[float] = []
            for y in ys:
                if not best:
                    best.append(y)
                else:
                    best.append(max(best[-1], y) if direction == "maximize" else min(best[-1], y))
            ax.step(xs, best, where="post", color="tab:red", label="best so far")
            ax.legend(loc="best", fontsize="small")
        ax.set_title(name)
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{name} ({direction})")
        ax.grid(alpha=0.3)
    return fig


def pareto_mask(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """True for each point no other point dominates (>= everywhere, > somewhere, per direction).

    Example:
        >>> pareto_mask([(1, 1), (2, 0), (0, 0)], ["maximize", "maximize"])
        [True, True, False]
    """
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    scored = [[s * v for s, v in zip(signs, p, strict=True)] for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(
            x > y for x, y in zip(a, b, strict=True))

    return [not any(dominates(o, p) for o in scored if o is not p) for p in scored]


def pareto_figure(points: Sequence[Sequence[float]], names: Sequence[str],
                  directions: Sequence[str], *, labels: Sequence[str] | None = None) -> Figure:
    """Scatter of the trials in objective space with the Pareto front highlighted.

    Two objectives give one panel; more give one panel per pair of objectives (front computed on
    all objectives). `labels` (e.g. trial numbers) annotate the front's points.
    """
    front = pareto_mask(points, directions) if points else []
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    fig = Figure(figsize=(5.2 * len(pairs), 4.4), layout="constrained")
    for k, (i, j) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), k + 1)
        rest = [p for p, f in zip(points, front, strict=True) if not f]
        on = [(p, lab) for idx, (p, f) in enumerate(zip(points, front, strict=True)) if f
              for lab in [labels[idx] if labels else None]]
        if rest:
            ax.scatter([p[i] for p in rest], [p[j] for p in rest], s=14, color="0.6",
                       label="dominated")
        if on:
            on.sort(key=lambda t: t[0][i])
            xs, ys = [p[i] for p, _ in on], [p[j] for p, _ in on]
            ax.plot(xs, ys, "-o", color="tab:red", markersize=5, label="Pareto front")
            for (p, lab) in on:
                if lab is not None:
                    ax.annotate(str(lab), (p[i], p[j]), textcoords="offset points",
                                xytext=(4, 4), fontsize="x-small")
        ax.set_xlabel(f"{names[i]} ({directions[i]})")
        ax.set_ylabel(f"{names[j]} ({directions[j]})")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    return fig


def weights_vs_depth_figure(recipe: Recipe, *, title: str | None = None) -> Figure | None:
    """Each numeric per-donor parameter of `recipe` against depth in [0, 1], one line per
    component and donor, one panel per parameter (weight first). None when nothing is merged.

    Example:
        >>> from vlmexp.merge.recipe import Recipe
        >>> r = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
        ...     "donors": [{"name": "vqa", "path": "d"}],
        ...     "components": {"language": {"vqa": {"weight": [0.1, 0.9]}}}})
        >>> float(weights_vs_depth_figure(r).axes[0].get_lines()[0].get_ydata()[-1])
        0.9
    """
    from vlmexp.merge.recipe import schedule_value

    curves: dict[str, dict[str, list[float]]] = {}
    for comp, per_donor in recipe.components.items():
        for donor, params in per_donor.items():
            for key, value in params.items():
                numeric = isinstance(value, list) or (
                    isinstance(value, (int, float)) and not isinstance(value, bool))
                if numeric:
                    curves.setdefault(key, {})[f"{comp}/{donor}"] = [
                        float(schedule_value(value, d)) for d in _DEPTHS]
    if not curves:
        return None
    keys = sorted(curves, key=lambda k: (k != "weight", k))
    fig = Figure(figsize=(6.4, 3.0 * len(keys)), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(len(keys), 1, i + 1)
        for label, ys in sorted(curves[key].items()):
            ax.plot(_DEPTHS, ys, label=label)
        ax.set_xlim(0, 1)
        ax.set_xlabel("depth")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    taken = ", ".join(f"{c} from {d}" for c, d in recipe.take.items())
    fig.suptitle((title or f"{recipe.method}: parameters vs depth")
                 + (f" (taken: {taken})" if taken else ""))
    return fig


def importances_figure(importances: Mapping[str, Mapping[str, float]]) -> Figure:
    """Horizontal bars of parameter importance, one panel per objective.

    Args:
        importances: objective name -> {param name: importance} (e.g. from
            `optuna.importance.get_param_importances`).
    """
    names = list(importances)
    height = max([len(v) for v in importances.values()] + [1])
    fig = Figure(figsize=(6.4 * len(names), 0.9 + 0.35 * height), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        items = sorted(importances[name].items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
        ax.set_title(name)
        ax.set_xlabel("importance")
        ax.tick_params(axis="y", labelsize="small")
    return fig
