"""Per-component search against one global weight pair, on the demo zoo, over several seeds.

Runs the demo study twice per seed, each into its own temporary Optuna and MLflow store:
`space=demo` (vision, projector and language model each get their own weights) and
`space=global` (one weight per donor for the whole model), same sampler, trials and pruning.
Prints, from this one run, each study's best trial on the validation split and on the held-out
test split, per seed and averaged.

Issue 5: per-submodule search should beat the global pair. Not a test.

Usage:
    python benchmarks/per_component.py [--trials 40] [--seeds 0 1 2] [key=value ...]
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


def run(space: str, trials: int, seed: int, extra: list[str], workdir: Path) -> dict:
    from vlmexp.search.config import compose
    from vlmexp.search.study import run_search

    workdir.mkdir(parents=True, exist_ok=True)
    cfg = compose([
        f"space={space}", f"search.n_trials={trials}", f"search.seed={seed}",
        f"search.storage=sqlite:///{workdir / 'optuna.db'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", f"study_name={space}", *extra,
    ])
    result = run_search(cfg, progress=True)
    best = result.best[0]
    test = result.test.get(best.number, {})
    return {"val": best.value, "test": test.get("combined", float("nan")),
            "vl": test.get("vl", float("nan")), "text": test.get("text", float("nan")),
            "params": best.params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("overrides", nargs="*", help="more config overrides for both studies")
    args = ap.parse_args()
    from vlmexp.search.config import compose
    from vlmexp.search.study import resolve_models

    resolve_models(compose().models)  # build the zoo first
    rows = []
    with tempfile.TemporaryDirectory(prefix="per_component-") as tmp:
        for seed in args.seeds:
            for space in ("demo", "global"):
                rows.append((seed, space, run(space, args.trials, seed, args.overrides,
                                              Path(tmp) / f"{seed}-{space}")))
    print(f"{'seed':>4} {'space':<8}{'best val':>10}{'test':>8}{'test vl':>9}{'test text':>10}"
          "  best weights")
    for seed, space, r in rows:
        weights = ", ".join(f"{k.removesuffix('.weight')} {v:.2f}" for k, v in r["params"].items())
        print(f"{seed:>4} {space:<8}{r['val']:>10.3f}{r['test']:>8.3f}{r['vl']:>9.3f}"
              f"{r['text']:>10.3f}  {weights}")

    def mean(space: str, key: str) -> float:
        values = [r[key] for _, s, r in rows if s == space]
        return sum(values) / len(values)

    print(f"mean best test combined: per-component {mean('demo', 'test'):.3f}, global "
          f"{mean('global', 'test'):.3f} ({mean('demo', 'test') - mean('global', 'test'):+.3f}); "
          f"validation {mean('demo', 'val'):.3f} vs {mean('global', 'val'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
