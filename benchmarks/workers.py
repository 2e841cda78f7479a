"""Several workers on one study: trials per minute with 1, 2 and 4 workers, and the storage's
own cost per trial.

Each run starts N `python -m vlmexp search` processes together on a fresh demo study (the demo
zoo, cached; SQLite Optuna and MLflow stores in a temporary folder, as several workers on one
machine share them) and reports the wall time and the evaluated trials per minute between the
first trial's start and the last one's end (the start-up, which loads the models once per
worker, is printed apart). The storage overhead is what a trial costs the storage alone, with no
model: ask, the worker's attrs, heartbeats, tell, on SQLite, a journal file and, with
`--postgres URL`, PostgreSQL.

    python benchmarks/workers.py [--trials 24] [--workers 1 2 4] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]


def run_workers(n: int, trials: int, folder: Path) -> dict[str, float]:
    import optuna

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlmexp", "search", "study_name=bench", "eval.test_tasks=[]",
           f"search.n_trials={trials}", "threads=1", "--no-progress"]
    t0 = time.time()
    procs = [subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(folder / f"worker-{i}.log", "wb")) for i in range(n)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a worker failed: see {folder}")
    wall = time.time() - t0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder / 'optuna.db'}")
    done = [t for t in study.trials if t.state.is_finished()]
    first = min(t.datetime_start for t in done).timestamp()
    last = max(t.datetime_complete for t in done).timestamp()
    evaluated = sum(t.state.name in ("COMPLETE", "PRUNED") for t in done)
    return {"wall": wall, "startup": first - t0, "trials": evaluated,
            "per_minute": 60 * evaluated / (last - first), "failed": len(done) - evaluated}


def storage_overhead(storage: str, trials: int = 200) -> float:
    """Mean seconds per trial the storage costs: ask, attrs, two heartbeats, tell."""
    import optuna

    from vlmexp.search.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"overhead-{time.time_ns()}",
                                storage=open_storage(storage))
    s = study._storage
    t0 = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("vlmexp.worker", "0")
        trial.set_user_attr("vlmexp.sampler_seed", 0)
        for _ in range(2):
            s.set_trial_system_attr(trial._trial_id, "vlmexp.heartbeat", [time.time(), "h", 1, "0"])
        study.tell(trial, x)
    return (time.perf_counter() - t0) / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--postgres", default=None, help="a PostgreSQL URL to time the storage on")
    args = ap.parse_args()
    from vlmexp.config import compose
    from vlmexp.search.study import resolve_models

    resolve_models(compose().models)  # the zoo is built (or found) before any timing
    print(f"{'workers':>7} {'wall s':>7} {'start-up s':>10} {'evaluated':>9} {'trials/min':>10}")
    for n in args.workers:
        with tempfile.TemporaryDirectory(prefix=f"vlmexp-workers-{n}-") as tmp:
            r = run_workers(n, args.trials, Path(tmp))
        print(f"{n:7d} {r['wall']:7.1f} {r['startup']:10.1f} {r['trials']:9d} "
              f"{r['per_minute']:10.1f}" + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    print(f"storage cost per trial, no model (200 trials; cores: {os.cpu_count()}):")
    with tempfile.TemporaryDirectory(prefix="vlmexp-storage-") as tmp:
        stores = {"sqlite": f"sqlite:///{tmp}/o.db", "journal": f"journal:{tmp}/o.log"}
        if args.postgres:
            stores["postgresql"] = args.postgres
        for name, url in stores.items():
            print(f"  {name:10s} {1000 * storage_overhead(url):7.1f} ms")


if __name__ == "__main__":
    main()
