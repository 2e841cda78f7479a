"""The published ways of choosing merge weights, against vlmexp's default search, on the demo zoo.

Every method gets the default study's budget, 40 candidate evaluations on the validation split,
and its pick is scored on the held-out test split by the study's own test report. Where
randomness enters (a sampler, DARE's masks), over 3 seeds. Each row but AdaMMS is a search
config run through `run_search` (its own temporary Optuna and MLflow store):

  task arithmetic, λ     `space=scale_ta`: base + λ·Σ(donor − base), λ on a 40-point grid in
                         [0.05, 2.0], every donor and component alike (mergekit users' hand tuning)
  TIES, λ                `space=scale_ties merge=ties`: the paper's top-20% (density 0.2), λ grid
  DARE-TIES, λ           `space=scale_dare merge=dare_ties`: drop rate 0.9 (density 0.1), the
                         paper's 1/p rescale, λ grid; masks from merge.seed (3 seeds)
  CMA-ES, one weight     `space=global search.sampler=cmaes`: one weight per donor
  per donor              for the whole model on the summed task scores (mergekit-evolve; 3 seeds)
  LM-only into the VLM   `space=language_into_vqa`: the vqa-expert whole, plus the text-expert's
                         language-model change at a scale on a 40-point grid in [0, 2]
                         ("Bring Reason to Vision")
  AdaMMS                 the vqa-expert's vision tower and projector, its language model
                         interpolated towards the text-expert's, (1 − α)·vqa + α·text, α on a
                         40-point grid in [0, 1]; α picked WITHOUT labels: the one whose
                         validation answers change least from its neighbours' (ties: the middle)
  AdaMerging             `space=layerwise eval=unsupervised search.sampler=cmaes`: per-depth
                         coefficients (3 knots per donor for vision tower and language model)
                         that minimise prediction entropy on unlabelled validation inputs, found
                         by CMA-ES, not by the paper's gradient descent (3 seeds)
  vlmexp, unsupervised   the default search with `eval=unsupervised` (3 seeds): also reports the
                         Spearman correlation of its objective with the labelled one over its
                         complete trials
  vlmexp (default)       `python -m vlmexp search` as shipped (3 seeds)
  Pareto (vl, text)      `search=pareto` (seed 0): the front's best test vl with test text >= 90%
                         of the text-expert's, for the skill-gap question

Every study row uses the default rung pruning (the same harness); "evals" counts candidates
evaluated, "full" their cost in full evaluations (a pruned candidate counts the share of items it
was scored on). AdaMMS scores each of its 40 candidates in full: its criterion needs every answer.
"wall s" is each row's own time (set-up, search and test report; after one untimed warm-up trial).

Usage:
    python benchmarks/baselines.py [--seeds 0 1 2] [--only NAME ...] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _studies import study

GRID = 40  # candidate evaluations per method: the default study's search.n_trials (--trials)


def grid(lo: float, hi: float) -> list[float]:
    return [round(lo + (hi - lo) * i / (GRID - 1), 6) for i in range(GRID)]


# name -> (study overrides, grid parameter or None, grid (low, high), seeded)
STUDIES: dict[str, tuple[list[str], str | None, tuple[float, float], bool]] = {
    "task arithmetic, λ": (["space=scale_ta"], "parameters.lambda",
                           (0.05, 2.0), False),
    "TIES (density 0.2), λ": (["space=scale_ties", "merge=ties"],
                              "parameters.lambda", (0.05, 2.0), False),
    "DARE-TIES (density 0.1), λ": (["space=scale_dare", "merge=dare_ties"],
                                   "parameters.lambda", (0.05, 2.0), True),
    "CMA-ES, one weight per donor": (["space=global", "search.sampler=cmaes",
                                      "search.baselines=false"], None, (0, 0), True),
    "LM-only into the VLM": (["space=language_into_vqa"],
                             "language+embed+head.text.weight", (0.0, 2.0), False),
    "AdaMerging (entropy, CMA-ES)": (["space=layerwise", "eval=unsupervised",
                                      "search.sampler=cmaes", "search.baselines=false"],
                                     None, (0, 0), True),
    "vlmexp, unsupervised": (["eval=unsupervised"], None, (0, 0), False),
    "vlmexp (default)": ([], None, (0, 0), True),
}
ADAMMS = "AdaMMS (α by answer agreement)"
PARETO = "Pareto (vl, text)"


def enqueue_grid(workdir: Path, name: str, param: str, values: list[float]) -> None:
    """A study whose trials are the grid, in order (the sampler never gets asked)."""
    import optuna

    workdir.mkdir(parents=True, exist_ok=True)
    s = optuna.create_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}",
                            direction="maximize")
    for v in values:
        s.enqueue_trial({param: v})


def budget(cfg: Any, name: str) -> tuple[int, float]:
    """Candidates evaluated and full-evaluation equivalents (a pruned trial counts the fraction
    of items its last rung reached)."""
    import optuna
    from optuna.trial import TrialState

    s = optuna.load_study(study_name=name, storage=cfg.search.storage)
    rungs = sorted(cfg.search.pruning.rungs)
    full = 0.0
    trials = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    for t in trials:
        if t.state == TrialState.COMPLETE:
            full += 1
        else:
            full += rungs[max(t.intermediate_values)] if t.intermediate_values else 0.0
    return len(trials), full


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


def unsupervised_vs_labelled(cfg: Any) -> tuple[float, int]:
    """Spearman correlation, over the study's complete trials, of the unsupervised objective
    with the labelled one (the same weights over the tasks' accuracies), and the trial count."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(str(cfg.study_name))
    runs = client.search_runs([exp.experiment_id], "tags.`vlmexp.role` = 'trial'",
                              max_results=10000)
    objective = cfg.search.objectives[0]
    weights = dict(cfg.eval.objectives[objective])
    xs, ys = [], []
    for r in runs:
        m = r.data.metrics
        if r.data.tags.get("vlmexp.state") != "COMPLETE" or f"objective.{objective}" not in m:
            continue
        xs.append(m[f"objective.{objective}"])
        ys.append(sum(w * m[f"{t}.acc"] for t, w in weights.items()) / sum(weights.values()))
    return spearman(xs, ys), len(xs)


def run_study(label: str, seed: int, tmp: Path, extra: list[str]) -> dict[str, Any]:
    overrides, param, (lo, hi), _ = STUDIES[label]
    workdir = tmp / f"{len(label)}-{abs(hash(label)) % 10**6}-{seed}"
    name = "baseline"
    seeds = [f"merge.seed={seed}"] if "merge=dare_ties" in overrides else []
    if param is not None:
        enqueue_grid(workdir, name, param, grid(lo, hi))
        overrides = [*overrides, "search.sampler=random", "search.baselines=false"]
    t0 = time.perf_counter()
    cfg, result = study([*overrides, *seeds, *extra], name=name, trials=GRID, seed=seed,
                        workdir=workdir)
    seconds = time.perf_counter() - t0
    trial = result.best[0]
    test = result.test.get(trial.number, {})
    evals, full = budget(cfg, name)
    row = {"vl": test["vl"], "text": test["text"], "combined": test["combined"],
           "val": trial.value, "evals": evals, "full": full, "seconds": seconds,
           "params": trial.params, "baselines_test": result.baselines_test}
    if "eval=unsupervised" in overrides:
        row["spearman"], row["n"] = unsupervised_vs_labelled(cfg)
    return row


def adamms(seed: int, tmp: Path, extra: list[str]) -> dict[str, Any]:
    """AdaMMS on the demo zoo: 40 interpolations scored on the validation inputs, α chosen by
    the stability of the answers alone, the pick scored on the test split."""
    from omegaconf import OmegaConf

    from vlmexp.config import compose
    from vlmexp.merge.recipe import Recipe
    from vlmexp.search.study import resolve_models, setup_engine, setup_evaluator

    t0 = time.perf_counter()
    cfg = compose(extra)
    base, donors = resolve_models(cfg.models, progress=False)
    engine = setup_engine(base, donors, device="cpu", vocab=str(cfg.merge.vocab))
    eval_node = OmegaConf.to_container(cfg.eval, resolve=True)
    evaluator = setup_evaluator(eval_node, engine.processor, device="cpu")

    def recipe(alpha: float) -> Recipe:
        lm = {"vqa": {"weight": 1.0 - alpha}, "text": {"weight": alpha}}
        return Recipe.from_dict({
            "method": "task_arithmetic", "base": base.to_dict(with_name=False),
            "donors": [d.to_dict() for d in donors],
            "components": {"vision": {"vqa": {"weight": 1.0}},
                           "projector": {"vqa": {"weight": 1.0}},
                           "language": lm, "embed": lm, "head": lm}}, source="AdaMMS")

    alphas = grid(0.0, 1.0)
    answers = []
    for alpha in alphas:
        engine.apply(recipe(alpha))
        result = evaluator.evaluate(engine.model)
        # the chosen answers only: AdaMMS reads no label
        answers.append([s.chosen for items in result.items.values() for s in items])

    def changed(i: int, j: int) -> float:
        return sum(a != b for a, b in zip(answers[i], answers[j], strict=True)) / len(answers[i])

    inner = range(1, len(alphas) - 1)  # both neighbours needed
    scores = {i: changed(i, i - 1) + changed(i, i + 1) for i in inner}
    low = min(scores.values())
    flat = [i for i in inner if scores[i] == low]
    pick = flat[len(flat) // 2]
    test = setup_evaluator(eval_node, engine.processor, device="cpu", test=True)
    engine.apply(recipe(alphas[pick]))
    values = test.evaluate(engine.model).objectives
    engine.reset()
    return {"vl": values["vl"], "text": values["text"], "combined": values["combined"],
            "val": float("nan"), "evals": len(alphas), "full": float(len(alphas)),
            "seconds": time.perf_counter() - t0, "params": {"alpha": alphas[pick]}}


def pareto(seed: int, tmp: Path, extra: list[str]) -> dict[str, Any]:
    """The (vl, text) Pareto search; its front's test scores (up to 8 members)."""
    t0 = time.perf_counter()
    cfg, result = study(["search=pareto", *extra], name="pareto", trials=GRID, seed=seed,
                        workdir=tmp / f"pareto-{seed}")
    return {"front": list(result.test.values()), "baselines_test": result.baselines_test,
            "seconds": time.perf_counter() - t0}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f}±{statistics.stdev(values):.3f}"


def main() -> int:
    global GRID
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=GRID, help="evaluations per method")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the rows whose name contains one of these words")
    ap.add_argument("overrides", nargs="*", help="more config overrides for every study")
    args = ap.parse_args()
    GRID = args.trials
    from vlmexp.config import compose
    from vlmexp.search.study import resolve_models

    resolve_models(compose().models)  # build the zoo first, so that no row's time includes it

    def wanted(label: str) -> bool:
        return args.only is None or any(w.lower() in label.lower() for w in args.only)

    rows: dict[str, list[dict[str, Any]]] = {}
    front = None
    with tempfile.TemporaryDirectory(prefix="baselines-") as tmp:
        # one untimed trial first: the process's one-time imports and compilations
        study([], name="warm-up", trials=1, seed=0, workdir=Path(tmp) / "warm-up")
        jobs: list[tuple[str, Callable[[int], dict[str, Any]], list[int]]] = []
        for label, (_, _, _, seeded) in STUDIES.items():
            jobs.append((label, lambda s, label=label: run_study(label, s, Path(tmp),
                                                                 args.overrides),
                         args.seeds if seeded else args.seeds[:1]))
        jobs.insert(-2, (ADAMMS, lambda s: adamms(s, Path(tmp), args.overrides),
                         args.seeds[:1]))
        for label, job, seeds in jobs:
            if not wanted(label):
                continue
            for seed in seeds:
                print(f"--- {label}, seed {seed}", file=sys.stderr, flush=True)
                rows.setdefault(label, []).append(job(seed))
                r = rows[label][-1]
                print(f"=== {label}, seed {seed}: test vl {r['vl']:.3f} text {r['text']:.3f} "
                      f"combined {r['combined']:.3f}, {r['seconds']:.0f} s", file=sys.stderr,
                      flush=True)
        if wanted(PARETO):
            print(f"--- {PARETO}, seed {args.seeds[0]}", file=sys.stderr, flush=True)
            front = pareto(args.seeds[0], Path(tmp), args.overrides)
    report(rows, front)
    return 0


def report(rows: dict[str, list[dict[str, Any]]], front: dict[str, Any] | None) -> None:
    print(f"{'method':<32}{'seeds':>6}{'test vl':>14}{'test text':>14}{'test combined':>15}"
          f"{'evals':>7}{'full':>7}{'wall s':>8}")
    for label, rs in rows.items():
        print(f"{label:<32}{len(rs):>6}{fmt([r['vl'] for r in rs]):>14}"
              f"{fmt([r['text'] for r in rs]):>14}{fmt([r['combined'] for r in rs]):>15}"
              f"{statistics.fmean(r['evals'] for r in rs):>7.0f}"
              f"{statistics.fmean(r['full'] for r in rs):>7.1f}"
              f"{statistics.fmean(r['seconds'] for r in rs):>8.0f}")
    print("\nper seed (test combined) and picks:")
    for label, rs in rows.items():
        for r in rs:
            picks = ", ".join(f"{k.removesuffix('.weight')} {v:.2f}" if isinstance(v, float)
                              else f"{k} {v}" for k, v in r["params"].items())
            extra = (f"  spearman(unsupervised, labelled)={r['spearman']:.2f} over {r['n']}"
                     if "spearman" in r else "")
            print(f"  {label:<32}{r['combined']:.3f}  {picks}{extra}")
    specialists = next((r["baselines_test"] for rs in rows.values() for r in rs
                        if r.get("baselines_test")), {}) or (front or {}).get("baselines_test", {})
    if specialists:
        vqa, text = specialists["vqa alone"], specialists["text alone"]
        print(f"\nspecialists on test: vqa-expert vl {vqa['vl']:.3f}, text-expert text "
              f"{text['text']:.3f}; 90% of each: vl {0.9 * vqa['vl']:.3f}, text "
              f"{0.9 * text['text']:.3f}")
        everything = [r for rs in rows.values() for r in rs]
        if front:
            everything += [dict(f) for f in front["front"]]
        keep = [r for r in everything if r["text"] >= 0.9 * text["text"]]
        if keep:
            top = max(keep, key=lambda r: r["vl"])
            print(f"best test vl among picks (and Pareto members) keeping >= 90% of the text "
                  f"skill: {top['vl']:.3f} = {top['vl'] / vqa['vl']:.0%} of the vqa-expert's "
                  f"(text {top['text']:.3f})")
        both = [r for r in everything if r["text"] >= 0.9 * text["text"]
                and r["vl"] >= 0.9 * vqa["vl"]]
        print(f"merges keeping >= 90% of both skills: {len(both)} of {len(everything)}")
    if front:
        print("Pareto front on test (vl, text): " + ", ".join(
            f"({f['vl']:.3f}, {f['text']:.3f})" for f in sorted(front["front"],
                                                                 key=lambda f: f["vl"])))


if __name__ == "__main__":
    sys.exit(main())
