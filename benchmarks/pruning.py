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

import sys
import tempfile
from pathlib import Path

from _studies import arguments, best, mean, study


def run(pruning: bool, trials: int, seed: int, extra: list[str], workdir: Path) -> dict:
    import mlflow

    cfg, result = study([f"search.pruning.enabled={str(pruning).lower()}", *extra],
                        name=f"pruning-{'on' if pruning else 'off'}", trials=trials, seed=seed,
                        workdir=workdir)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(str(cfg.study_name))
    runs = client.search_runs([exp.experiment_id], "tags.`vlmexp.role` = 'trial'",
                              max_results=10000)
    eval_s = sum(r.data.metrics.get("seconds.eval", 0.0) for r in runs)
    # items evaluated: the same cost, free of timing noise (evaluation time is linear in items)
    key = f"intermediate.{cfg.search.objectives[0]}"
    items = sum(max((m.step for m in client.get_metric_history(r.info.run_id, key)), default=0)
                for r in runs)
    return {**best(result), "eval_s": eval_s, "items": items,
            "pruned": sum(r.data.tags.get("vlmexp.state") == "PRUNED" for r in runs),
            "trials": len(runs), "total_s": result.seconds}


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
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

    def mean_of(pruning: bool, key: str) -> float:
        return mean(rows, pruning, key)

    saved = 1 - mean_of(True, "eval_s") / mean_of(False, "eval_s")
    items_saved = 1 - mean_of(True, "items") / mean_of(False, "items")
    print(f"evaluation time saved: {saved:.0%} (goal >= 40%); items evaluated saved: "
          f"{items_saved:.0%}; mean best val "
          f"{mean_of(True, 'val'):.3f} with pruning vs {mean_of(False, 'val'):.3f} without; "
          f"mean best test {mean_of(True, 'test'):.3f} vs {mean_of(False, 'test'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
