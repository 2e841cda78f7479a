"""Evaluation: image-text scoring, lm-eval on the live model, tasks loaded from `evals/`.

Example:
    >>> from vlmexp.eval import Evaluator
    >>> ev = Evaluator.from_config({"tasks": ["evals/examples"]}, processor)  # doctest: +SKIP
    >>> ev.evaluate(model).metrics  # doctest: +SKIP
"""

from __future__ import annotations

from vlmexp.eval.evaluator import EvalResult, Evaluator, ItemScore
from vlmexp.eval.tasks import Item, Task, Variant, load_task, load_tasks

__all__ = ["EvalResult", "Evaluator", "Item", "ItemScore", "Task", "Variant", "load_task",
           "load_tasks"]
