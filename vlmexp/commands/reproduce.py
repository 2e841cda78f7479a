"""`python -m vlmexp reproduce RUN_ID --out DIR` (or `--best`): rebuild a trial's checkpoint.

The checkpoint is rebuilt from the run's `recipe.yaml` and the model folders alone and checked
against the run: the weights digest must equal the logged `vlmexp.weights_digest`, or, where it
does not (an exact digest holds only on the same device and dtype: a rebuild on another GPU or on
the CPU rounds some entries differently), every component's fingerprint (float64 sum and norm,
`vlmexp.fingerprint.<component>`) must agree within `merge.fingerprint.TOLERANCE` (1e-6 relative
for float32 weights, 1e-4 for bf16/fp16); else nothing is written. `--evaluate` re-runs the
study's evaluation (the `eval` node of its logged config) and prints the logged and the new value
of each objective and metric.

Example:
    python -m vlmexp reproduce --best --experiment demo --out merged/ --evaluate
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vlmexp.commands import add_model_flags
from vlmexp.errors import CheckpointError, TrackingError
from vlmexp.search.mlflow_store import DEFAULT_URI

if TYPE_CHECKING:
    from vlmexp.merge.engine import ApplyResult, MergeEngine
    from vlmexp.search.runs import RunInfo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="rebuild a tracked trial's checkpoint from its recipe",
                       description=__doc__.splitlines()[0])
    p.add_argument("run_id", nargs="?", default=None, help="MLflow run id of the trial")
    p.add_argument("--best", action="store_true",
                   help="the best trial of the experiment (instead of a run id)")
    p.add_argument("--experiment", default=None,
                   help="experiment name for --best (default: the most recent vlmexp study)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI (default: {DEFAULT_URI} here)")
    p.add_argument("--evaluate", action="store_true",
                   help="re-run the study's evaluation and compare with the logged values")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    add_model_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmexp.config import check_device

    if args.device is not None:
        check_device(args.device, key="--device")
    from vlmexp.checkpoint import save_model
    from vlmexp.merge.engine import MergeEngine
    from vlmexp.search.runs import find_run

    if (args.run_id is None) == (not args.best):
        raise TrackingError("give either a RUN_ID or --best")
    if args.experiment is not None and not args.best:
        raise TrackingError("--experiment goes with --best")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    info = find_run(args.tracking_uri, run_id=args.run_id, best=args.best,
                    experiment=args.experiment)
    what = f"run {info.run_id}" + (f" (trial {info.trial})" if info.trial is not None else "")
    print(f"reproducing {what} of experiment {info.experiment!r}", file=sys.stderr)
    recipe = info.recipe
    engine = MergeEngine.from_recipe(recipe, device=args.device,
                                     trust_remote_code=args.trust_remote_code,
                                     allow_pickle=args.allow_pickle)
    result = engine.apply(recipe)
    verdict = _verify(info, result, engine, what)
    save_model(engine.model, out, processor=engine.processor, source_dir=engine.sources["base"],
               force=args.force)
    engine.pin(recipe).save(out / "recipe.yaml")
    print(f"weights digest {result.weights_digest} ({verdict}) -> {out}", file=sys.stderr)
    if args.evaluate:
        _evaluate(info, engine)
    return 0


def _verify(info: RunInfo, result: ApplyResult, engine: MergeEngine, what: str) -> str:
    """How the rebuilt merge matches the run (for the final line); TrackingError where not."""
    from vlmexp.merge.fingerprint import compare, tolerance_for

    if info.weights_digest is None:
        print(f"warning: {what} has no logged weights digest; the rebuild cannot be verified",
              file=sys.stderr)
        return "unverified"
    if result.weights_digest == info.weights_digest:
        return "matches the run"
    mismatch = (f"{what}: rebuilt weights digest {result.weights_digest} does not match the "
                f"logged {info.weights_digest}")
    if not info.fingerprints:
        raise TrackingError(f"{mismatch}, and the run logged no fingerprints to compare within "
                            f"a tolerance; nothing written")
    tolerance = tolerance_for({t.dtype for t in engine.state_dict_view().values()})
    check = compare(info.fingerprints, result.fingerprints, tolerance=tolerance)
    if not check.agree:
        raise TrackingError(f"{mismatch}, and the weights differ beyond rounding: {check.why}; "
                            f"nothing written")
    print(f"note: the weights digest differs from the logged {info.weights_digest}: an exact "
          f"digest holds only on the same device and dtype; every component's fingerprint "
          f"agrees ({check.why})", file=sys.stderr)
    return f"agrees with the run's fingerprints within {tolerance:.0e}"


def _evaluate(info: RunInfo, engine: MergeEngine) -> None:
    """Re-run the study's evaluation on the rebuilt model; print logged vs now."""
    from vlmexp.errors import EvalError
    from vlmexp.eval import Evaluator
    from vlmexp.eval.evaluator import eval_config
    from vlmexp.search.runs import load_study_config

    config = load_study_config(info.tracking_uri, info.run_id)
    if not isinstance(config.get("eval"), dict):
        raise EvalError(f"run {info.run_id}: the study's config.yaml has no 'eval' mapping "
                        f"to evaluate with")
    evaluator = Evaluator.from_config(eval_config(config["eval"], device=engine.device),
                                      engine.processor)
    result = evaluator.evaluate(engine.model)
    now = {f"objective.{k}": v for k, v in result.objectives.items()}
    now.update({f"{task}.{m}": v for task, ms in result.metrics.items() for m, v in ms.items()})
    logged = {f"objective.{k}": v for k, v in info.values.items()}
    logged.update(info.metrics)
    print(format_comparison(logged, now))
    differ = []
    for task, identity in result.tasks.items():
        was = info.tasks.get(task)
        if was is None:
            print(f"task {task}: {identity} (the study logged no identity for it)")
        elif was != identity:
            print(f"task {task}: {identity} (the study: {was})")
            differ.append(task)
        else:
            print(f"task {task}: {identity} (as logged)")
    if differ:  # the rebuilt checkpoint stands; its scores here are not the study's kind
        raise EvalError(f"task {differ[0]} is not evaluated as the study evaluated it (another "
                        f"version, protocol or prompt): the scores above are not comparable; "
                        f"the rebuilt checkpoint was written")


def format_comparison(logged: dict[str, float], now: dict[str, float]) -> str:
    """A plain table of `name  logged  now  diff`, objectives first, then the logged metrics.

    Example:
        >>> print(format_comparison({"objective.acc": 0.5}, {"objective.acc": 0.5}))
        name           logged     now    diff
        objective.acc  0.5000  0.5000  +0.0000
    """
    names = [k for k in now if k.startswith("objective.")]
    names += [k for k in now if k not in names and k in logged]
    names += [k for k in logged if k not in names]
    width = max([len("name"), *(len(n) for n in names)])

    def cell(v: float | None) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{v:.4f}"

    lines = [f"{'name':<{width}}  {'logged':>6}  {'now':>6}  {'diff':>6}"]
    for name in names:
        a, b = logged.get(name), now.get(name)
        diff = "-" if a is None or b is None else f"{b - a:+.4f}"
        lines.append(f"{name:<{width}}  {cell(a):>6}  {cell(b):>6}  {diff:>6}")
    return "\n".join(lines)
