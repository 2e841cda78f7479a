"""Rung schedule, the paired sign test and the pruning decisions, without a model."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest

from vlmexp.search.pruning import PRUNERS, Pruning, paired_p_value


def test_paired_p_value():
    assert paired_p_value(0, 0) == 1.0
    assert paired_p_value(5, 0) == pytest.approx(1 / 32)
    assert paired_p_value(8, 1) == pytest.approx(10 / 512)
    assert paired_p_value(0, 5) == 1.0
    assert paired_p_value(3, 3) == pytest.approx(42 / 64)


def test_record_keeps_the_best_complete_trials_items():
    pruning = Pruning(objectives=["c"], pruner="paired")
    items = {"t": [{"index": 4, "value": 1.0}, {"index": 9, "value": 0.0}],
             "ppl": [{"index": 0, "value": None}]}  # a perplexity's documents: not compared
    worse = SimpleNamespace(state="COMPLETE", values={"c": 0.4}, items=items, intermediate=[])
    better = SimpleNamespace(state="COMPLETE", values={"c": 0.6},
                             items={"t": [{"index": 4, "value": 0.0}]}, intermediate=[])
    pruned = SimpleNamespace(state="PRUNED", values={}, items=items, intermediate=[])
    pruning.record(worse)
    assert pruning.history.best_items == {("t", 4): 1.0, ("t", 9): 0.0}
    pruning.record(better)
    pruning.record(pruned)
    assert pruning.history.best_value == 0.6 and pruning.history.best_items == {("t", 4): 0.0}
    assert pruning.history.complete == 2


def test_record_keeps_the_lowest_of_a_minimised_objective():
    pruning = Pruning(objectives=["ppl"], directions=["minimize"], pruner="paired")
    for value in (30.0, 12.0, 20.0):
        pruning.record(SimpleNamespace(state="COMPLETE", values={"ppl": value}, intermediate=[],
                                       items={"t": [{"index": 0, "value": value}]}))
    assert pruning.history.best_value == 12.0
    assert pruning.history.best_items == {("t", 0): 12.0}
    with pytest.raises(ValueError, match="one of maximize, minimize per objective"):
        Pruning(objectives=["a", "b"], directions=["minimize"])
    with pytest.raises(ValueError, match="one of maximize, minimize"):
        Pruning(objectives=["a"], directions=["lower"])


def test_stops_and_optuna_pruners():
    p = Pruning(objectives=["c"], rungs=[0.5, 0.25, 0.25, 1.0])
    assert p.stops(baseline=False) == [0.25, 0.5, 1.0]
    assert p.stops(baseline=True) == [1.0]
    assert Pruning(objectives=["c"], enabled=False).stops(baseline=False) == [1.0]
    assert isinstance(Pruning(objectives=["c"], enabled=False).optuna_pruner(),
                      optuna.pruners.NopPruner)
    kinds = {name: type(Pruning(objectives=["c"], pruner=name).optuna_pruner()).__name__
             for name in PRUNERS}
    assert kinds == {"percentile": "PercentilePruner", "median": "MedianPruner",
                     "halving": "SuccessiveHalvingPruner", "paired": "NopPruner",
                     "subset": "NopPruner"}


def _part(value: dict[int, float | None]):
    items = [SimpleNamespace(index=i, value=None if v is None else float(v))
             for i, v in value.items()]
    return SimpleNamespace(items={"t": items})


def test_paired_decision_counts_discordant_items():
    pruning = Pruning(objectives=["c"], pruner="paired", p_threshold=0.02, startup_trials=1)
    trial = SimpleNamespace(report=lambda value, step: None)
    best = {"t": [{"index": i, "value": 1.0} for i in range(6)]}
    assert pruning.decide(trial, 0, 6, {"c": 0.0}, [_part(dict.fromkeys(range(6), False))]) \
        is None  # before startup_trials complete trials, nothing is pruned
    pruning.record(SimpleNamespace(state="COMPLETE", values={"c": 1.0}, items=best,
                                   intermediate=[]))
    # 5 items worse than the best, none better (item 5 agrees): p = 1/32, above 0.02
    five = _part({0: False, 1: False, 2: False, 3: False, 4: False, 5: True})
    assert pruning.decide(trial, 0, 6, {"c": 1 / 6}, [five]) is None
    six = _part(dict.fromkeys(range(6), False))  # p = 1/64, below 0.02
    reason = pruning.decide(trial, 0, 6, {"c": 0.0}, [six])
    assert reason is not None and "worse than the best on 6 items, better on 0" in reason


def test_several_objectives_prune_a_dominated_trial():
    pruning = Pruning(objectives=["a", "b"], startup_trials=0, margin=0.1)
    trial = SimpleNamespace(report=lambda value, step: None)
    pruning.record(SimpleNamespace(state="COMPLETE", values={"a": 0.9, "b": 0.9}, items=None,
                                   intermediate=[(10, {"a": 0.8, "b": 0.8}),
                                                 (20, {"a": 0.9, "b": 0.9})]))
    assert pruning.decide(trial, 0, 10, {"a": 0.75, "b": 0.5}, []) is None  # within the margin on a
    reason = pruning.decide(trial, 0, 10, {"a": 0.6, "b": 0.5}, [])
    assert reason is not None and reason.startswith("dominated after 10 items")
    assert pruning.decide(trial, 1, 20, {"a": 0.0, "b": 0.0}, []) is None  # no complete trial's rung 1


def test_paired_decision_follows_the_direction():
    """Minimised per-item values: a trial whose items are higher than the best's is worse."""
    pruning = Pruning(objectives=["c"], directions=["minimize"], pruner="paired",
                      p_threshold=0.02, startup_trials=1)
    trial = SimpleNamespace(report=lambda value, step: None)
    best = {"t": [{"index": i, "value": 2.0} for i in range(6)]}
    pruning.record(SimpleNamespace(state="COMPLETE", values={"c": 2.0}, items=best,
                                   intermediate=[]))
    lower = _part(dict.fromkeys(range(6), 1.0))  # better on every item: go on
    assert pruning.decide(trial, 0, 6, {"c": 1.0}, [lower]) is None
    higher = _part(dict.fromkeys(range(6), 3.0))
    reason = pruning.decide(trial, 0, 6, {"c": 3.0}, [higher])
    assert reason is not None and "worse than the best on 6 items, better on 0" in reason
    # items without a value of their own are not compared
    assert pruning.decide(trial, 0, 6, {"c": 3.0}, [_part(dict.fromkeys(range(6)))]) is None


def test_several_objectives_domination_follows_the_directions():
    pruning = Pruning(objectives=["acc", "ppl"], directions=["maximize", "minimize"],
                      startup_trials=0, margin=0.1)
    trial = SimpleNamespace(report=lambda value, step: None)
    pruning.record(SimpleNamespace(state="COMPLETE", values={"acc": 0.9, "ppl": 5.0}, items=None,
                                   intermediate=[(10, {"acc": 0.8, "ppl": 6.0}),
                                                 (20, {"acc": 0.9, "ppl": 5.0})]))
    # lower accuracy, lower (better) perplexity: not dominated
    assert pruning.decide(trial, 0, 10, {"acc": 0.5, "ppl": 4.0}, []) is None
    assert pruning.decide(trial, 0, 10, {"acc": 0.5, "ppl": 6.05}, []) is None  # within the margin
    reason = pruning.decide(trial, 0, 10, {"acc": 0.5, "ppl": 7.0}, [])
    assert reason is not None and reason.startswith("dominated after 10 items")


def test_optuna_pruner_follows_the_study_direction():
    """Optuna's own pruners read the direction from the study: with minimize, the lowest
    intermediate values survive."""
    pruning = Pruning(objectives=["ppl"], directions=["minimize"], pruner="percentile",
                      percentile=50.0, startup_trials=0)
    study = optuna.create_study(direction="minimize", pruner=pruning.optuna_pruner())
    for value in (10.0, 20.0, 30.0):
        t = study.ask()
        t.report(value, step=0)
        study.tell(t, value)
    low, high = study.ask(), study.ask()
    assert pruning.decide(low, 0, 6, {"ppl": 9.0}, []) is None
    assert pruning.decide(high, 0, 6, {"ppl": 25.0}, []) is not None
