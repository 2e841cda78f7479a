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
    items = {"t": [{"index": 4, "correct": True}, {"index": 9, "correct": False}]}
    worse = SimpleNamespace(state="COMPLETE", values={"c": 0.4}, items=items, intermediate=[])
    better = SimpleNamespace(state="COMPLETE", values={"c": 0.6},
                             items={"t": [{"index": 4, "correct": False}]}, intermediate=[])
    pruned = SimpleNamespace(state="PRUNED", values={}, items=items, intermediate=[])
    pruning.record(worse)
    assert pruning.history.best_items == {("t", 4): True, ("t", 9): False}
    pruning.record(better)
    pruning.record(pruned)
    assert pruning.history.best_value == 0.6 and pruning.history.best_items == {("t", 4): False}
    assert pruning.history.complete == 2


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
                     "halving": "SuccessiveHalvingPruner", "paired": "NopPruner"}


def _part(correct: dict[int, bool]):
    items = [SimpleNamespace(index=i, correct=c) for i, c in correct.items()]
    return SimpleNamespace(items={"t": items})


def test_paired_decision_counts_discordant_items():
    pruning = Pruning(objectives=["c"], pruner="paired", p_threshold=0.02, startup_trials=1)
    trial = SimpleNamespace(report=lambda value, step: None)
    best = {"t": [{"index": i, "correct": True} for i in range(6)]}
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
