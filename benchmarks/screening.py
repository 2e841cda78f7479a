"""Subset screening (MERGE³-style cheap fitness) against today's rung pruning, on the demo study.

The `subset` pruner estimates a candidate's full-validation-set score from the items scored so
far (a fixed share of every task) with a standard error (`Evaluator.estimate`), and stops it
when the estimate plus `z` standard errors is below the best complete trial. Runs the default
study (40 trials, same sampler and seeds) with the default percentile pruner and with the
subset screen at the same rungs (1/8, 1/4 and 1/2 of every task), each into its own temporary
store, and prints from this one run: items evaluated (against every trial in
full, which is exact: without pruning each trial scores every item), seconds spent evaluating,
and the best trial's validation and held-out test score, per seed and averaged.

Issue 17, point 5. Not a test.

Usage:
    python benchmarks/screening.py [--trials 40] [--seeds 0 1 2] [key=value ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _studies import arguments, mean
from pruning import run

VARIANTS = {  # the same rungs (1/8, 1/4, 1/2 of every task), two rules
    "percentile": [],
    "subset": ["search.pruning.pruner=subset"],
}


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    from omegaconf import OmegaConf

    from vlmexp.config import compose
    from vlmexp.search.study import resolve_models, setup_engine, setup_evaluator

    # items in a full evaluation: what a trial costs without pruning
    cfg = compose(args.overrides)
    base, donors = resolve_models(cfg.models, progress=False)
    engine = setup_engine(base, donors, device="cpu", vocab=str(cfg.merge.vocab))
    evaluator = setup_evaluator(OmegaConf.to_container(cfg.eval, resolve=True), engine.processor,
                                device="cpu")
    full = sum(len(evaluator.subset(t)) for t in evaluator.tasks)
    del engine, evaluator
    rows = []
    with tempfile.TemporaryDirectory(prefix="screening-") as tmp:
        for seed in args.seeds:
            for name, extra in VARIANTS.items():
                r = run(True, args.trials, seed, [*extra, *args.overrides],
                        Path(tmp) / f"{seed}-{name.replace(' ', '-').replace('/', '')}")
                rows.append((seed, name, r))
    print(f"{'seed':>4} {'pruner':<12}{'trials':>7}{'pruned':>8}{'items':>8}{'eval s':>9}"
          f"{'best val':>10}{'best test':>10}")
    for seed, name, r in rows:
        print(f"{seed:>4} {name:<12}{r['trials']:>7}{r['pruned']:>8}{r['items']:>8}"
              f"{r['eval_s']:>9.1f}{r['val']:>10.3f}{r['test']:>10.3f}")
    print(f"without pruning every trial scores all {full} items: {args.trials * full} per study")
    ref = mean(rows, "percentile", "eval_s")
    for name in VARIANTS:
        items = mean(rows, name, "items")
        print(f"{name:<12} items saved vs no pruning {1 - items / (args.trials * full):.0%}; "
              f"eval time {mean(rows, name, 'eval_s'):.1f} s "
              f"({mean(rows, name, 'eval_s') / ref - 1:+.0%} vs percentile); mean best val "
              f"{mean(rows, name, 'val'):.3f}, test {mean(rows, name, 'test'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
