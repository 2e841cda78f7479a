"""What the study benchmarks (per_component.py, pruning.py) share: running demo studies, each
into its own temporary Optuna and MLflow store, over several seeds, and their best trials."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def arguments(description: str) -> argparse.Namespace:
    """--trials, --seeds and config overrides given to every study; builds the zoo first (so
    that no study's time includes it)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("overrides", nargs="*", help="more config overrides for every study")
    args = ap.parse_args()
    from vlmexp.config import compose
    from vlmexp.search.study import resolve_models

    resolve_models(compose().models)
    return args


def study(overrides: list[str], *, name: str, trials: int, seed: int,
          workdir: Path) -> tuple[Any, Any]:
    """Run one demo study into stores under `workdir`: (its composed config, its result)."""
    from vlmexp.config import compose
    from vlmexp.search.study import run_search

    workdir.mkdir(parents=True, exist_ok=True)
    cfg = compose([
        f"search.n_trials={trials}", f"search.seed={seed}",
        f"search.storage=sqlite:///{workdir / 'optuna.db'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", f"study_name={name}", *overrides,
    ])
    return cfg, run_search(cfg, progress=True)


def best(result: Any) -> dict[str, Any]:
    """The best trial: validation value, test scores (combined, vl, text) and parameters."""
    trial = result.best[0]
    test = result.test.get(trial.number, {})
    nan = float("nan")
    return {"val": trial.value, "test": test.get("combined", nan), "vl": test.get("vl", nan),
            "text": test.get("text", nan), "params": trial.params}


def mean(rows: list[tuple[int, Any, dict]], variant: Any, key: str) -> float:
    """The mean of `key` over the seeds' rows (seed, variant, figures) of one variant."""
    values = [r[key] for _, v, r in rows if v == variant]
    return sum(values) / len(values)
