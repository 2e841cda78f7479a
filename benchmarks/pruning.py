"""Pruning: evaluation time saved, and the quality found, with and without pruning.

Runs the demo study with pruning off and on from the same seeds (same sampler, same number of
trials), each into its own temporary Optuna and MLflow store, and prints from this one run:
seconds spent evaluating and items evaluated (the same cost without the timing noise of a
shared machine), the fractions saved, and the best trial's combined score on the
validation split and on the held-out test split, per seed and averaged (one seed's sampler
path is too noisy a basis for "equal quality").

Goal (issue 6): >= 40 % of evaluation time saved at equal quality. Not a test.

Usage:
    python benchmarks/pruning.py [--trials 40] [--seeds 0 1 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def run(pruning: bool, trials: int, seed: int, extra: list[str], workdir: Path) -> dict:
    import mlflow

    from vlmexp.search.config import compose
    from vlmexp.search.study import run_search

    workdir.mkdir(parents=True, exist_ok=True)
    cfg = compose([
        f"search.n_trials={trials}", f"search.seed={seed}",
        f"search.pruning.enabled={str(pruning).lower()}",
        f"search.storage=sqlite:///{workdir / 'optuna.db'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"study_name=pruning-{'on' if pruning else 'off'}", *extra,
    ])
    result = run_search(cfg, progress=True)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(str(cfg.study_name))
    runs = client.search_runs([exp.experiment_id], "tags.`vlmexp.role` = 'trial'",
                              max_results=10000)
    eval_s = sum(r.data.metrics.get("seconds.eval", 0.0) for r in runs)
    # items evaluated: the same cost, free of timing noise (evaluation time is linear in items)
    key = f"intermediate.{cfg.search.objectives[0]}"
    items = sum(max((m.step for m in client.get_metric_history(r.info.run_id, key)), default=0)
                for r in runs)
    best = result.best[0]
    test = result.test.get(best.number, {})
    return {"eval_s": eval_s, "items": items, "val": best.value, "test": test.get("combined", float("nan")),
            "pruned": sum(r.data.tags.get("vlmexp.state") == "PRUNED" for r in runs),
            "trials": len(runs), "total_s": result.seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("overrides", nargs="*", help="more config overrides for both runs")
    args = ap.parse_args()
    from vlmexp.search.config import compose
    from vlmexp.search.study import resolve_models

    resolve_models(compose().models)  # build the zoo first, outside both timings
    rows = []
    with tempfile.TemporaryDirectory(prefix="pruning-") as tmp:
        for seed in args.seeds:
            for pruning in (False, True):
                r = run(pruning, args.trials, seed, args.overrides,
                        Path(tmp) / f"{seed}-{pruning}")
                rows.append((seed, pruning, r))
    print(f"{'seed':>4} {'pruning':<8}{'trials':>7}{'pruned':>8}{'items':>8}{'eval s':>9}"
          f"{'study s':>9}{'best val':>10}{'best test':>10}")
    for seed, pruning, r in rows:
        print(f"{seed:>4} {'on' if pruning else 'off':<8}{r['trials']:>7}{r['pruned']:>8}"
              f"{r['items']:>8}{r['eval_s']:>9.1f}{r['total_s']:>9.1f}{r['val']:>10.3f}"
              f"{r['test']:>10.3f}")

    def mean(pruning: bool, key: str) -> float:
        values = [r[key] for _, p, r in rows if p == pruning]
        return sum(values) / len(values)

    saved = 1 - mean(True, "eval_s") / mean(False, "eval_s")
    items_saved = 1 - mean(True, "items") / mean(False, "items")
    print(f"evaluation time saved: {saved:.0%} (goal >= 40%); items evaluated saved: "
          f"{items_saved:.0%}; mean best val "
          f"{mean(True, 'val'):.3f} with pruning vs {mean(False, 'val'):.3f} without; "
          f"mean best test {mean(True, 'test'):.3f} vs {mean(False, 'test'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
