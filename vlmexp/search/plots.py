"""Study plots as matplotlib `Figure`s: Optuna's own plots where Optuna has them, and weights
against depth, which no library draws.

The optimisation history, the Pareto front and the parameter importances are
`optuna.visualization.matplotlib`'s (experimental in Optuna 5: its warning is silenced here, and
its `ggplot` style stays inside each call). Each function returns figures for the caller to save
or log (`Tracker.finish` logs them as PNG artifacts of the study's parent run) and then `close`.

Example:
    >>> import optuna
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> study = optuna.create_study(direction="maximize")
    >>> study.optimize(lambda t: t.suggest_float("w", 0, 1), n_trials=3)
    >>> figs = history_figures(study, ["acc"])
    >>> list(figs), figs["optimization_history"].axes[0].get_ylabel()
    (['optimization_history'], 'acc')
    >>> close(figs)
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from vlmexp.layout import COMPONENTS

if TYPE_CHECKING:
    import optuna

    from vlmexp.merge.recipe import Recipe

_DEPTHS = [i / 100 for i in range(101)]
_DONOR_STYLES = ["-", "--", ":", "-."]


@contextlib.contextmanager
def _optuna_plotting() -> Iterator[None]:
    """Optuna's matplotlib plots without their ExperimentalWarning or a lasting global style."""
    import matplotlib
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="No artists with labels")  # no complete trial
        yield


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


def _sign(study: optuna.Study, i: int) -> float:
    """+1 where objective i is maximised: Optuna's importance evaluator ranks low targets."""
    import optuna

    return -1.0 if study.directions[i] == optuna.study.StudyDirection.MAXIMIZE else 1.0


def history_figures(study: optuna.Study, names: Sequence[str]) -> dict[str, Figure]:
    """`plot_optimization_history`: each trial's value and the best so far.

    One objective gives `{"optimization_history": fig}`; several give one figure per objective,
    `optimization_history_<name>` (Optuna draws the best-so-far line for one objective only).
    """
    from optuna.visualization.matplotlib import plot_optimization_history

    figs: dict[str, Figure] = {}
    with _optuna_plotting():
        if len(names) == 1:
            ax = plot_optimization_history(study, target_name=names[0])
            ax.set_ylabel(names[0])
            figs["optimization_history"] = ax.figure
        else:
            for i, name in enumerate(names):
                ax = plot_optimization_history(study, target=lambda t, i=i: t.values[i],
                                               target_name=name)
                ax.set_title(f"Optimization History Plot: {name} "
                             f"({study.directions[i].name.lower()})")
                figs[f"optimization_history_{_safe(name)}"] = ax.figure
    return figs


def pareto_figure(study: optuna.Study, names: Sequence[str]) -> Figure:
    """`plot_pareto_front` (two or three objectives) with the front's trials (`study.best_trials`)
    annotated by number."""
    from optuna.visualization.matplotlib import plot_pareto_front

    with _optuna_plotting():
        ax = plot_pareto_front(study, target_names=list(names))
        if len(names) == 2:
            for t in study.best_trials:
                ax.annotate(str(t.number), (t.values[0], t.values[1]), textcoords="offset points",
                            xytext=(4, 4), fontsize="x-small")
    return ax.figure


def importances_figures(study: optuna.Study, names: Sequence[str]) -> dict[str, Figure]:
    """`plot_param_importances` (Optuna's default evaluator), one figure per objective:
    `param_importances`, or `param_importances_<name>` for several objectives (each ranked by
    what makes that objective good, whichever its direction)."""
    from optuna.visualization.matplotlib import plot_param_importances

    figs: dict[str, Figure] = {}
    with _optuna_plotting():
        if len(names) == 1:
            ax = plot_param_importances(study, target_name=names[0])
            figs["param_importances"] = ax.figure
        else:
            for i, name in enumerate(names):
                # Optuna's own multi-objective importances rank what makes t.values[i] *low*
                sign = _sign(study, i)
                ax = plot_param_importances(
                    study, target=lambda t, i=i, s=sign: s * t.values[i], target_name=name)
                ax.set_title(f"Hyperparameter Importances: {name}")
                figs[f"param_importances_{_safe(name)}"] = ax.figure
    return figs


def close(figs: Figure | Mapping[str, Figure] | None) -> None:
    """Release figures that Optuna made through pyplot (its plots are pyplot figures)."""
    import matplotlib.pyplot as plt

    for fig in (figs.values() if isinstance(figs, Mapping) else [figs]):
        if fig is not None:
            plt.close(fig)


def _curves(recipe: Recipe) -> dict[str, dict[str, dict[str, list[float]]]]:
    """parameter -> donor -> component -> value at each of `_DEPTHS`."""
    from vlmexp.merge.recipe import schedule_value

    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    order = {c: i for i, c in enumerate(COMPONENTS)}
    for comp in sorted(recipe.components, key=lambda c: (order.get(c, len(order)), c)):
        for donor, params in recipe.components[comp].items():
            for key, value in params.items():
                numeric = isinstance(value, list) or (
                    isinstance(value, (int, float)) and not isinstance(value, bool))
                if numeric:
                    curves.setdefault(key, {}).setdefault(donor, {})[comp] = [
                        float(schedule_value(value, d)) for d in _DEPTHS]
    return curves


def _grouped(per_component: Mapping[str, list[float]]) -> list[tuple[str, list[float]]]:
    """Components whose curves are equal (tied ones) as one curve labelled `a+b+c`."""
    groups: dict[tuple[float, ...], list[str]] = {}
    for comp, ys in per_component.items():
        groups.setdefault(tuple(ys), []).append(comp)
    return [("+".join(comps), list(ys)) for ys, comps in groups.items()]


def weights_vs_depth_figure(recipe: Recipe, *, title: str | None = None) -> Figure | None:
    """Each numeric per-donor parameter of `recipe` against depth in [0, 1], one panel per
    parameter (weight first), one line per component and donor. Components with equal values
    (tied ones) share one line labelled `language+embed+head/<donor>`; each donor has its own line
    style, so a donor's line stays visible where another's crosses it. None when nothing is merged.

    Example:
        >>> from vlmexp.merge.recipe import Recipe
        >>> r = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
        ...     "donors": [{"name": "vqa", "path": "d"}],
        ...     "components": {"language": {"vqa": {"weight": [0.1, 0.9]}},
        ...                    "embed": {"vqa": {"weight": [0.1, 0.9]}}}})
        >>> line = weights_vs_depth_figure(r).axes[0].get_lines()[0]
        >>> line.get_label(), float(line.get_ydata()[-1])
        ('language+embed/vqa', 0.9)
    """
    curves = _curves(recipe)
    if not curves:
        return None
    keys = sorted(curves, key=lambda k: (k != "weight", k))
    donors = list(dict.fromkeys(d.name for d in recipe.donors))
    fig = Figure(figsize=(6.4, 3.0 * len(keys)), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(len(keys), 1, i + 1)
        for donor, per_component in curves[key].items():
            style = _DONOR_STYLES[donors.index(donor) % len(_DONOR_STYLES)
                                  if donor in donors else 0]
            for label, ys in _grouped(per_component):
                ax.plot(_DEPTHS, ys, style, linewidth=2, label=f"{label}/{donor}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("depth")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    taken = ", ".join(f"{c} from {d}" for c, d in recipe.take.items())
    fig.suptitle((title or f"{recipe.method}: parameters vs depth")
                 + (f" (taken: {taken})" if taken else ""))
    return fig


def candidates_weights_figure(recipes: Mapping[str, Recipe], *, key: str = "weight"
                              ) -> Figure | None:
    """Parameter `key` against depth for several candidates, one panel per component (tied
    components, equal in every candidate, share a panel titled `language+embed+head`), one
    colour per candidate and one line style per donor. None when no recipe has `key`.

    Example:
        >>> from vlmexp.merge.recipe import Recipe
        >>> def r(w):
        ...     return Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
        ...         "donors": [{"name": "vqa", "path": "d"}],
        ...         "components": {"vision": {"vqa": {"weight": w}}, "language": {"vqa": {"weight": w}}}})
        >>> fig = candidates_weights_figure({"trial 3": r(0.5), "trial 7": r([0.1, 0.9])})
        >>> [ax.get_title() for ax in fig.axes]
        ['vision+language']
    """
    per_recipe = {label: _curves(recipe).get(key, {}) for label, recipe in recipes.items()}
    comps: list[str] = []
    for curves in per_recipe.values():
        for per_component in curves.values():
            comps += [c for c in per_component if c not in comps]
    if not comps:
        return None
    order = {c: i for i, c in enumerate(COMPONENTS)}
    comps.sort(key=lambda c: (order.get(c, len(order)), c))

    def signature(comp: str) -> tuple:
        return tuple((label, donor, tuple(per_component.get(comp, ())))
                     for label, curves in per_recipe.items()
                     for donor, per_component in curves.items())

    panels: dict[tuple, list[str]] = {}
    for comp in comps:
        panels.setdefault(signature(comp), []).append(comp)
    donors = list(dict.fromkeys(d for curves in per_recipe.values() for d in curves))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    for i, group in enumerate(panels.values()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, (label, curves) in enumerate(per_recipe.items()):
            for donor, per_component in curves.items():
                if group[0] in per_component:
                    ax.plot(_DEPTHS, per_component[group[0]],
                            _DONOR_STYLES[donors.index(donor) % len(_DONOR_STYLES)],
                            color=f"C{j % 10}", linewidth=2, label=f"{label}: {donor}")
        ax.set_title("+".join(group))
        ax.set_xlim(0, 1)
        ax.set_xlabel("depth")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="x-small")
    return fig
