"""`python -m vlmexp search [key=value ...]`: run (or resume) a merge search study.

Overrides are Hydra's (`search.n_trials=20`, `merge=ties`, `+space.knots.language=3`); with no
arguments the demo study runs on the demo zoo (built on first use). `--cfg` prints the composed
configuration and exits.
"""

from __future__ import annotations

import argparse

from vlmexp.environment import describe
from vlmexp.search.mlflow_store import DEFAULT_URI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search merge weights with Optuna, tracked in MLflow",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra config overrides")
    p.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    p.add_argument("--config-dir", default=None, help="a conf/ folder of your own")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from vlmexp.config import compose

    cfg = compose(args.overrides, config_dir=args.config_dir)
    if args.cfg:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    from vlmexp.search.study import run_search

    result = run_search(cfg, progress=not args.no_progress)
    print(summary(cfg, result))
    return 0


def summary(cfg, result) -> str:
    """The end-of-study report: best trial(s), held-out scores against the baselines."""
    lines = [f"study {result.study_name!r}: {result.trials} trials in {result.seconds:.0f} s"]
    if not result.best:
        lines.append("no trial completed")
        return "\n".join(lines)
    objectives = list(cfg.search.objectives)
    label = "best trial" if len(objectives) == 1 else "Pareto front"
    lines.append(f"{label}:")
    lower = {o for o, d in result.directions.items() if d == "minimize"}
    for t in result.best:
        vals = ", ".join(f"{o}={v:.3f}" + (" (lower is better)" if o in lower else "")
                         for o, v in zip(objectives, t.values, strict=True))
        lines.append(f"  #{t.number}: {vals} (validation)")
    if result.test:
        names = sorted({k for v in [*result.test.values(), *result.baselines_test.values()]
                        for k in v})
        width = max(len(n) for n in [*result.baselines_test, "trial #0000"]) + 2
        lines.append("held-out test split:")
        lines.append("  " + "model".ljust(width) + "".join(n.rjust(10) for n in names))
        rows = [(name, vals) for name, vals in result.baselines_test.items()]
        rows += [(f"trial #{n}", vals) for n, vals in result.test.items()]
        for name, vals in rows:
            lines.append("  " + name.ljust(width)
                         + "".join(f"{vals.get(n, float('nan')):10.3f}" for n in names))
        lower_test = [n for n in names if result.test_directions.get(n) == "minimize"]
        if lower_test:
            lines.append(f"  lower is better: {', '.join(lower_test)}")
        # the zoo is trained on this CPU: numbers compare only with those of the same line
        lines.append(f"  measured with {describe()}")
    uri = cfg.tracking.uri or DEFAULT_URI
    lines.append(f"MLflow: {uri} (experiment {cfg.tracking.experiment or cfg.study_name!r}); "
                 f"browse with: mlflow ui --backend-store-uri {uri} (the trials: 'Model "
                 f"training', then the experiment's Runs)")
    experiment = str(cfg.tracking.experiment or cfg.study_name)
    where = f" --experiment {experiment}" + ("" if uri == DEFAULT_URI else f" --tracking-uri {uri}")
    if len(objectives) == 1:
        lines.append(f"rebuild the best: python -m vlmexp reproduce --best{where} --out merged/")
    else:
        lines.append("rebuild a trial of the front: python -m vlmexp reproduce RUN_ID"
                     + ("" if uri == DEFAULT_URI else f" --tracking-uri {uri}") + " --out merged/")
    return "\n".join(lines)
