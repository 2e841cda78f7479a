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

import sys
import tempfile
from pathlib import Path

from _studies import arguments, best, mean, study


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="per_component-") as tmp:
        for seed in args.seeds:
            for space in ("demo", "global"):
                _, result = study([f"space={space}", *args.overrides], name=space,
                                  trials=args.trials, seed=seed,
                                  workdir=Path(tmp) / f"{seed}-{space}")
                rows.append((seed, space, best(result)))
    print(f"{'seed':>4} {'space':<8}{'best val':>10}{'test':>8}{'test vl':>9}{'test text':>10}"
          "  best weights")
    for seed, space, r in rows:
        weights = ", ".join(f"{k.removesuffix('.weight')} {v:.2f}" for k, v in r["params"].items())
        print(f"{seed:>4} {space:<8}{r['val']:>10.3f}{r['test']:>8.3f}{r['vl']:>9.3f}"
              f"{r['text']:>10.3f}  {weights}")
    demo, flat = mean(rows, "demo", "test"), mean(rows, "global", "test")
    print(f"mean best test combined: per-component {demo:.3f}, global {flat:.3f} "
          f"({demo - flat:+.3f}); validation {mean(rows, 'demo', 'val'):.3f} vs "
          f"{mean(rows, 'global', 'val'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
