"""`python -m vlmexp evaluate MODEL [--tasks ...] [--eval-config FILE] [--out FILE.json]`.

Scores a model on evaluation tasks (image-text and lm-eval), prints a table per task and per
objective and writes the same, with per-item results, as JSON. MODEL is a checkpoint folder
or hub id (`org/name[@revision]`, opened with `vlmexp.checkpoint.open_model`), a recipe YAML
(merged in memory first, from its base and donors) or `tiny:NAME` (a tiny random model with its tiny processor). Tasks come from `--tasks` (YAML files or folders), from `--eval-config`, a YAML with `tasks`,
`objectives` and `batch_size` (paths relative to that file), or else from the `eval` group of
`conf/` with Hydra overrides (`eval=demo`, the default; `--test` for its held-out tasks).

Example:
    $ python -m vlmexp evaluate tiny:llava --tasks evals/examples --out eval.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmexp.commands import add_model_flags
from vlmexp.errors import CheckpointError, EvalError

if TYPE_CHECKING:
    import torch

    from vlmexp.eval.evaluator import EvalResult, Evaluator

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a model on evaluation tasks and objectives",
        description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL",
                   help="model folder, hub id, recipe YAML or tiny:NAME")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="without --tasks/--eval-config: the eval group of conf/ (e.g. eval=demo)")
    p.add_argument("--test", action="store_true",
                   help="with the eval group: its held-out test tasks and objectives")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="task YAML files or folders")
    p.add_argument("--eval-config", metavar="FILE",
                   help="YAML with tasks, objectives, batch_size (paths relative to it)")
    p.add_argument("--out", metavar="FILE.json", help="write metrics, objectives and items here")
    p.add_argument("--batch-size", type=int, default=None, help="choices per forward (default 16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    p.add_argument("--start", type=int, default=0, help="first item of each task's subset")
    p.add_argument("--stop", type=int, default=None, help="end of the items of each subset")
    add_model_flags(p)
    p.set_defaults(run=run)


def load_model(spec: str, device: str = "cpu", *, trust_remote_code: bool = False,
               allow_pickle: bool = False) -> tuple[torch.nn.Module, Any]:
    """The model and processor named by `spec` (`tiny:NAME`, a recipe YAML or a checkpoint)."""
    from vlmexp.zoo import is_tiny, open_tiny

    opts = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    if is_tiny(spec):
        model, processor = open_tiny(spec)
        return model.to(device), processor
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        return merged_model(spec, device, **opts)
    from vlmexp.checkpoint import open_model

    loaded = open_model(spec, device=device, **opts)
    if loaded.processor is None:
        raise CheckpointError(f"{spec}: no processor or tokenizer files to evaluate with")
    return loaded.model, loaded.processor


def merged_model(recipe_path: str, device: str = "cpu", *, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> tuple[torch.nn.Module, Any]:
    """The recipe's merge, applied in memory to its base, and the base's processor."""
    import sys

    from vlmexp.merge.engine import MergeEngine
    from vlmexp.merge.recipe import Recipe

    recipe = Recipe.from_yaml(recipe_path)
    engine = MergeEngine.from_recipe(recipe, device=device, progress=False,
                                     trust_remote_code=trust_remote_code,
                                     allow_pickle=allow_pickle)
    result = engine.apply(recipe)
    print(f"merged {recipe_path} in memory ({result.merged} tensors, {result.weights_digest})",
          file=sys.stderr)
    if engine.processor is None:
        raise CheckpointError(f"{recipe.base.path}: no processor or tokenizer files to evaluate "
                              f"with")
    return engine.model, engine.processor


def check_eval_config(cfg: dict[str, Any], where: str) -> None:
    """EvalError naming the key when an --eval-config file is not what `eval` takes."""
    known = {"tasks", "objectives", "batch_size", "test_tasks", "test_objectives"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise EvalError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(known))})")
    for key in ("objectives", "test_objectives"):
        for name, weights in (cfg.get(key) or {}).items():
            if not isinstance(weights, dict) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool)
                    for w in weights.values()):
                raise EvalError(f"{where}: {key}.{name} must map task names to numeric weights, "
                                f"got {weights!r}")
    size = cfg.get("batch_size", 16)
    if isinstance(size, bool) or not isinstance(size, int):
        raise EvalError(f"{where}: batch_size: {size!r} is not a whole number")


def build_evaluator(args: argparse.Namespace, processor: Any) -> Evaluator:
    from vlmexp.eval.evaluator import Evaluator

    if args.eval_config:
        import yaml

        cfg_path = Path(args.eval_config)
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise EvalError(f"{cfg_path}: cannot read ({str(err).splitlines()[0]})") from err
        if not isinstance(cfg, dict):
            raise EvalError(f"{cfg_path}: an eval config must be a mapping")
        check_eval_config(cfg, str(cfg_path))
        base = cfg_path.parent
        if args.tasks:  # --tasks overrides the config's task list; paths then are the cwd's
            cfg = {**cfg, "tasks": [os.path.abspath(t) for t in args.tasks]}
    elif args.tasks:
        cfg, base = {"tasks": args.tasks}, Path(".")
    else:  # the search config's eval group (Hydra overrides such as eval=demo)
        from vlmexp.config import compose, to_dict
        from vlmexp.eval.evaluator import eval_config

        composed = compose(getattr(args, "overrides", []) or [])
        cfg = eval_config(to_dict(composed.eval), device=getattr(args, "device", "cpu"),
                          test=getattr(args, "test", False))
        base = Path(".")
    if args.batch_size is not None:
        cfg = {**cfg, "batch_size": args.batch_size}
    cfg = {**cfg, "device": getattr(args, "device", "cpu")}
    return Evaluator.from_config(cfg, processor, base_dir=base)


def format_table(result: EvalResult) -> str:
    """Tasks (metrics, items, seconds) and objectives as aligned text."""
    names = sorted({m for metrics in result.metrics.values() for m in metrics})
    width = max([len("task")] + [len(t) for t in result.metrics] + [len(o) for o in result.objectives])
    cols = {m: max(9, len(m)) for m in names}  # per-category names (acc/<category>) are long
    lines = [f"{'task':<{width}}  " + "  ".join(f"{m:>{cols[m]}}" for m in names)
             + f"  {'items':>5}  {'sec':>6}"]
    for task, metrics in result.metrics.items():
        cells = "  ".join(f"{metrics[m]:>{cols[m]}.4f}" if m in metrics else f"{'-':>{cols[m]}}"
                          for m in names)
        lines.append(f"{task:<{width}}  {cells}  {len(result.items.get(task, [])):>5}  "
                     f"{result.seconds.get(task, math.nan):>6.2f}")
    lines += ["", f"{'objective':<{width}}  {'value':>9}"]
    lines += [f"{o:<{width}}  {v:>9.4f}" for o, v in result.objectives.items()]
    lines.append(f"total {result.seconds.get('total', math.nan):.2f} s")
    return "\n".join(lines)


def write_json(result: EvalResult, out: str | os.PathLike) -> None:
    """Write atomically: a temporary file beside `out`, renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from vlmexp.checkpoint import current_umask

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from colleagues
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result.to_json(), f, indent=1)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate_model(model: torch.nn.Module, processor: Any, evaluator: Evaluator,
                   out: str | os.PathLike | None = None, *, start: int = 0, stop: int | None = None,
                   progress: bool = True) -> EvalResult:
    """Evaluate a live model, print the table, write JSON to `out` if given; return the result.

    The processor is the evaluator's; it is passed here so that callers that build the model
    elsewhere (a recipe merged in memory) state what they evaluate with.

    Example:
        >>> result = evaluate_model(model, processor, evaluator, "eval.json")  # doctest: +SKIP
    """
    if processor is not evaluator.processor:
        raise EvalError("the evaluator was built for another processor")
    result = evaluator.evaluate(model, start=start, stop=stop, progress=progress)
    print(format_table(result))
    if out is not None:
        write_json(result, out)
    return result


def run(args: argparse.Namespace) -> int:
    from vlmexp.config import check_device

    if args.device is not None:
        check_device(args.device, key="--device")
    from vlmexp.checkpoint import resolve_device

    args.device = resolve_device(args.device)
    model, processor = load_model(args.model, device=args.device,
                                  trust_remote_code=args.trust_remote_code,
                                  allow_pickle=args.allow_pickle)
    evaluator = build_evaluator(args, processor)
    evaluate_model(model, processor, evaluator, args.out, start=args.start, stop=args.stop)
    return 0
