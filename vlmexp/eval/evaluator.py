"""The Evaluator: scores a live model on a fixed set of tasks and folds them into objectives.

Everything that does not depend on the weights is prepared once: task data, the processor's
encoding of each item (image + prompt -> input tensors) and its answers' token ids
(`encode_choices`: each answer as the continuation of the exact prompt string), lm-eval's task
objects. `evaluate(model)` then only runs the model, so a search can call it hundreds of times.

An image item is scored on each of its task's prompts (`Task.variants`: one, or one per rotation
of its options under CircularEval); it counts as right only if every one is answered right.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmexp.errors import EvalError
from vlmexp.eval.prompt import image_prompt
from vlmexp.eval.scorer import ContinuationScore, encode_choices, model_type, score_items
from vlmexp.eval.tasks import Item, Task, Variant, load_tasks
from vlmexp.serial import json_safe

# How an objective is computed from a task (`eval.objective`): "labelled" from the task's primary
# metric (accuracy against the answers), "unsupervised" from its `confidence` (no label read).
OBJECTIVE_KINDS = ("labelled", "unsupervised")
CONFIDENCE = "confidence"

# Batches of items per `score_items` call: enough that prompts of one length fill batches of
# their own (unpadded), few enough that the progress bar moves.
_WINDOW = 16


@dataclass
class ItemScore:
    """One item's outcome: the chosen and correct answers, the margin and every choice's score.

    `margin` is the correct answer's score minus the best other score (> 0 iff answered right,
    ties aside); `scores` are summed log-probabilities, in the order of the item's choices (for
    `protocol: mmbench`, of their letters). Under CircularEval `rotations` holds the scores of
    every further rotation (in that rotation's letter order), `correct` is true only if every
    rotation was answered right and `margin` is the smallest rotation's margin; `chosen` is
    always the answer picked in the original order.
    `values` (lm-eval tasks) holds lm-eval's per-sample value of each metric of the task, which
    `Evaluator.joined` aggregates again over several evaluations. `value` is the item's own score
    on its task's primary metric where items compare one by one (image tasks: 1.0 if right, else
    0.0; lm-eval: the per-sample value of a metric aggregated by a mean), None where only the
    aggregate over items means something (perplexities, f1, bleu).
    """

    task: str
    index: int
    chosen: str
    answer: str
    correct: bool
    margin: float
    scores: list[float]
    rotations: list[list[float]] = field(default_factory=list)
    value: float | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.value is None and not self.values:  # an image item: right or wrong
            self.value = float(self.correct)


@dataclass
class EvalResult:
    """Metrics per task, objectives, per-item scores and timings of one evaluation."""

    metrics: dict[str, dict[str, float]]
    objectives: dict[str, float]
    items: dict[str, list[ItemScore]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, str] = field(default_factory=dict)  # task -> identity (Evaluator.identity)

    def to_json(self) -> dict:
        """A JSON-ready dict (NaN margins become None)."""
        items = {t: [json_safe(asdict(s)) for s in scores] for t, scores in self.items.items()}
        return {"metrics": self.metrics, "objectives": self.objectives, "tasks": self.tasks,
                "items": items, "seconds": self.seconds}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _item_score(task: str, item: Item, variants: Sequence[Variant],
                scores: Sequence[list[float]]) -> ItemScore:
    """The item's outcome over all its prompts: right only if every prompt is answered right."""
    right, margins = [], []
    for variant, s in zip(variants, scores, strict=True):
        right.append(_argmax(s) == variant.gold)
        margins.append(s[variant.gold] - max(x for i, x in enumerate(s) if i != variant.gold))
    chosen = variants[0].options[_argmax(scores[0])]
    return ItemScore(task, item.index, chosen, item.answer, all(right), min(margins),
                     list(scores[0]), [list(s) for s in scores[1:]])


def _image_accuracy(task: Task, scores: Sequence[ItemScore]) -> dict[str, float]:
    """An image task's accuracy metrics over `scores`: its primary metric (acc, recall@1), the
    share of items answered right, and `acc/<category>` per category present (the primary
    metric's name, then the category as the data spells it; flat keys, so that they log as
    MLflow metrics `<task>.acc/<category>`). The one place these shares are computed."""
    groups: dict[str | None, list[bool]] = {None: []}
    for score in scores:
        groups[None].append(bool(score.correct))
        category = task.items[score.index].category
        if category is not None:
            groups.setdefault(category, []).append(bool(score.correct))
    return {(task.primary_metric if c is None else f"{task.primary_metric}/{c}"):
            sum(flags) / len(flags) for c, flags in groups.items() if flags}


def item_confidence(scores: Sequence[float]) -> float:
    """1 − H(p)/log K for p = softmax of one item's K choice log-likelihoods: 1 when the model
    puts all its mass on one choice, 0 when it is uniform (K < 2: 1). Reads no label.

    Example:
        >>> round(item_confidence([math.log(0.5), math.log(0.5)]), 6)
        0.0
    """
    k = len(scores)
    if k < 2:
        return 1.0
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    entropy = -sum(w / total * math.log(w / total) for w in weights if w > 0)
    return 1.0 - entropy / math.log(k)


def _confidence(scores: Sequence[ItemScore]) -> float:
    """A task's unsupervised score: the mean `item_confidence` over its items (AdaMerging's
    entropy, rescaled so that higher is better and one scale serves any number of choices)."""
    return sum(item_confidence(s.scores) for s in scores) / len(scores)


def _share_tensors(first: dict[str, torch.Tensor], prefix: dict[str, torch.Tensor]) -> None:
    """Let `prefix` hold `first`'s tensors where they are equal (a rotation's pixel values are
    its item's): the encodings of one item's prompts keep one copy of the image in memory."""
    for key, value in prefix.items():
        other = first.get(key)
        if other is not None and other.shape == value.shape and torch.equal(other, value):
            prefix[key] = other


class Evaluator:
    """Evaluate models on image-text and lm-eval tasks; objectives are weighted sets of tasks.

    Image tasks report their primary metric (`acc`, or `recall@1` for caption retrieval: argmax
    of summed answer log-probs, like lm-eval's acc) and `margin` (mean over items); cloze tasks
    also `acc_norm` (log-prob per answer character, like lm-eval's) and `acc_token_mean`
    (per-token mean); CircularEval tasks also `acc_vanilla` (the original option order alone);
    tasks whose items have categories also `acc/<category>` (the primary metric per category).
    lm-eval tasks report every metric of the task as lm-eval computes it (`vlmexp.eval.lmeval`).
    An objective is maximised, or minimised when its tasks' primary metrics are lower-is-better
    ones (perplexities); one that mixes the two is an EvalError (`directions`).

    Args:
        tasks: loaded tasks (`load_tasks`).
        objectives: objective name -> {task name: weight}; the objective is the weighted mean of
            its tasks' primary metrics (acc, recall@1 or the lm-eval task's `metric`).
        processor: the model's processor (its tokenizer serves lm-eval).
        batch_size: image tasks: items scored together, and prompts (then answers) per
            forward; lm-eval's batch size.
        device: where inputs go; the model stays where it is.
        objective: "labelled" (objectives from the tasks' primary metrics) or "unsupervised"
            (from each task's `confidence`, 1 − the mean normalized entropy of the choice
            distribution: no answer is read; for users with inputs but no labels).

    Example:
        >>> ev = Evaluator.from_config({"tasks": ["evals/examples/shapes_jsonl.yaml"],
        ...     "objectives": {"vl": {"example_shapes_jsonl": 1.0}}}, processor)  # doctest: +SKIP
        >>> ev.evaluate(model).objectives["vl"]  # doctest: +SKIP
        0.5
    """

    def __init__(self, tasks: Sequence[Task], objectives: Mapping[str, Mapping[str, float]],
                 processor: Any, *, batch_size: int = 16, device: str = "cpu",
                 objective: str = "labelled") -> None:
        self.tasks = {t.name: t for t in tasks}
        if objective not in OBJECTIVE_KINDS:
            raise EvalError(f"objective {objective!r} is not one of {', '.join(OBJECTIVE_KINDS)}")
        self.objective = objective
        if len(self.tasks) != len(tasks):
            raise EvalError("two tasks share one name")
        for obj, weights in objectives.items():
            for name, w in weights.items():
                if name not in self.tasks:
                    raise EvalError(f"objective {obj!r} names unknown task {name!r} (known: {', '.join(self.tasks)})")
                if not float(w) >= 0:
                    raise EvalError(f"objective {obj!r}: weight of {name!r} must be >= 0, got {w!r}")
        self.objectives = {o: {t: float(w) for t, w in ws.items()} for o, ws in objectives.items()}
        image_tasks = [t.name for t in tasks if t.kind != "lm_eval"]
        if image_tasks and not hasattr(processor, "image_processor"):
            # a bare tokenizer ignores images: the model would be scored without seeing them
            raise EvalError(f"{image_tasks[0]}: image tasks need the model's processor, but "
                            f"{type(processor).__name__} has no image processor (are the "
                            f"checkpoint's processor files missing or broken?)")
        if int(batch_size) < 1:
            raise EvalError(f"batch_size must be at least 1, got {batch_size}")
        self.processor = processor
        self.batch_size = batch_size
        self.device = device
        self._encoded: dict[tuple[str, int, str],
                            list[tuple[dict[str, torch.Tensor], list[list[int]]]]] = {}
        self._subsets = {t.name: t.subset_indices() for t in tasks if t.kind != "lm_eval"}
        self._identity: dict[str, str] | None = None
        lm_tasks = [t for t in tasks if t.kind == "lm_eval"]
        self._lmeval = None
        if lm_tasks:
            from vlmexp.eval.lmeval import LmEvalRunner

            self._lmeval = LmEvalRunner(
                list(dict.fromkeys(str(t.lm_eval_task) for t in lm_tasks)),
                include_paths=[t.include_path for t in lm_tasks if t.include_path],
                batch_size=batch_size, device=device,
                where={t.lm_eval_task: str(t.path) for t in lm_tasks},
            )
            for t in lm_tasks:
                self._subsets[t.name] = t.subset_indices(self._lmeval.num_docs(t.lm_eval_task))
        if objective == "unsupervised":
            self._check_unsupervised(lm_tasks)
        self._directions = {t.name: self._task_direction(t) for t in tasks}
        self._objective_directions = {o: self._objective_direction(o) for o in self.objectives}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], processor: Any, *, base_dir: str | Path = ".") -> Evaluator:
        """Build from `{"tasks": [paths or folders], "objectives": {...}, "batch_size": 16}`.

        Task paths are relative to `base_dir`. Without `objectives`, each task is its own.

        Example:
            >>> cfg = {"tasks": ["evals/examples"], "batch_size": 8}
            >>> ev = Evaluator.from_config(cfg, processor)  # doctest: +SKIP
        """
        if "tasks" not in cfg or not cfg["tasks"]:
            raise EvalError("evaluation config has no 'tasks'")
        paths = cfg["tasks"]
        if isinstance(paths, (str, Path)):
            paths = [paths]
        tasks = load_tasks([Path(base_dir) / p for p in paths])
        objectives = cfg.get("objectives") or {t.name: {t.name: 1.0} for t in tasks}
        return cls(tasks, objectives, processor, batch_size=int(cfg.get("batch_size", 16)),
                   device=str(cfg.get("device", "cpu")),
                   objective=str(cfg.get("objective", "labelled")))

    def _check_unsupervised(self, lm_tasks: Sequence[Task]) -> None:
        """The unsupervised objective needs a choice distribution per item: lm-eval tasks must
        be multiple choice."""
        for t in lm_tasks:
            assert self._lmeval is not None
            kind = getattr(self._lmeval.tasks[str(t.lm_eval_task)], "OUTPUT_TYPE", "")
            if kind != "multiple_choice":
                raise EvalError(f"{t.path}: objective unsupervised needs multiple-choice tasks; "
                                f"lm-eval task {t.lm_eval_task!r} is {kind or 'not'} multiple "
                                f"choice")

    def _objective_metric(self, task: Task) -> str:
        """The metric of `task` that objectives average (`objective`)."""
        return CONFIDENCE if self.objective == "unsupervised" else task.primary_metric

    def _task_direction(self, task: Task) -> str:
        """"maximize" or "minimize": how the task's primary metric improves (image tasks: up;
        lm-eval tasks: as the task's `higher_is_better()` says; confidence: up)."""
        if task.kind != "lm_eval" or self.objective == "unsupervised":
            return "maximize"
        assert self._lmeval is not None and task.lm_eval_task is not None
        declared = self._lmeval.higher_is_better(task.lm_eval_task)
        metric = task.primary_metric
        if metric not in declared:
            raise EvalError(f"{task.path}: lm-eval task {task.lm_eval_task!r} has no metric {metric!r} "
                            f"(has {', '.join(declared) or 'none'})")
        if declared[metric] is None:
            raise EvalError(f"{task.path}: lm-eval task {task.lm_eval_task!r} declares no direction "
                            f"(higher_is_better) for {metric!r}")
        return "maximize" if declared[metric] else "minimize"

    def _objective_direction(self, objective: str) -> str:
        tasks = self.objectives[objective]
        directions = {self._directions[t] for t in tasks}
        if len(directions) > 1:
            detail = ", ".join(f"{t} ({self._directions[t]})" for t in tasks)
            raise EvalError(f"objective {objective!r} mixes metrics that improve in opposite "
                            f"directions: {detail}; put them in separate objectives")
        return directions.pop() if directions else "maximize"

    def directions(self) -> dict[str, str]:
        """Each objective's direction, "maximize" or "minimize", the way all its tasks' primary
        metrics improve (an accuracy up, a perplexity down; the constructor refuses an objective
        whose tasks disagree).

        Example:
            >>> evaluator.directions()  # doctest: +SKIP
            {'vl': 'maximize', 'text_ppl': 'minimize'}
        """
        return dict(self._objective_directions)

    def subset(self, task: str) -> list[int]:
        """The task's deterministic subset (positions into its items or lm-eval docs)."""
        return list(self._subsets[task])

    # --- image tasks ------------------------------------------------------------------------

    def _encode(self, task: Task, item: Item, variants: Sequence[Variant],
                mtype: str) -> list[tuple[dict[str, torch.Tensor], list[list[int]]]]:
        """Each prompt's prefix inputs and its answers' continuation ids, encoded once; the image
        is decoded once per item and its pixel tensors are shared by the item's prompts."""
        key = (task.name, item.index, mtype)
        if key not in self._encoded:
            image = item.load_image()
            encoded = []
            for variant in variants:
                prompt = image_prompt(self.processor, variant.text, chat_template=task.chat_template)
                prefix, continuations = encode_choices(self.processor, image, prompt,
                                                       variant.answers, model_type=mtype)
                if encoded:
                    _share_tensors(encoded[0][0], prefix)
                encoded.append((prefix, continuations))
            self._encoded[key] = encoded
        return self._encoded[key]

    def _scored(self, model: torch.nn.Module, task: Task, positions: list[int],
                mtype: str) -> Iterator[tuple[int, list[Variant], list[list[ContinuationScore]]]]:
        """Each position with its item's variants and their choices' scores; the prompts of
        `_WINDOW` batches' worth of items go to one `score_items` call."""
        size = _WINDOW * self.batch_size
        for start in range(0, len(positions), size):
            window = positions[start:start + size]
            variants = [task.variants(task.items[pos]) for pos in window]
            encoded = [self._encode(task, task.items[pos], vs, mtype)
                       for pos, vs in zip(window, variants, strict=True)]
            flat = score_items(model, [pair for pairs in encoded for pair in pairs],
                               batch_size=self.batch_size)
            for pos, vs in zip(window, variants, strict=True):
                yield pos, vs, flat[:len(vs)]
                flat = flat[len(vs):]

    def _image_task(self, model: torch.nn.Module, task: Task, positions: list[int],
                    progress: Any) -> tuple[dict[str, float], list[ItemScore]]:
        mtype = model_type(model)
        out: list[ItemScore] = []
        norm_correct = mean_correct = first_correct = 0
        for pos, variants, scores in self._scored(model, task, positions, mtype):
            item = task.items[pos]
            bad = [v.answers[i] for v, vs in zip(variants, scores, strict=True)
                   for i, sc in enumerate(vs) if not math.isfinite(sc.logprob)]
            if bad:  # a NaN would make max() pick the first choice: a score, never a number
                raise EvalError(f"task {task.name}: item {item.index} ({item.where}): the score "
                                f"of {bad[0]!r} is not finite (NaN or inf: the model's outputs "
                                f"overflowed or its weights are not finite)")
            out.append(_item_score(task.name, item, variants, [[s.logprob for s in v] for v in scores]))
            gold = variants[0].gold
            first_correct += _argmax([s.logprob for s in scores[0]]) == gold
            per_char = [s.logprob / max(len(a), 1) for s, a in zip(scores[0], variants[0].answers,
                                                                    strict=True)]
            norm_correct += _argmax(per_char) == gold
            mean_correct += _argmax([s.mean for s in scores[0]]) == gold
            if progress is not None:
                progress.update(1)
        n = len(out)
        shares = _image_accuracy(task, out)
        metrics = {task.primary_metric: shares.pop(task.primary_metric)}
        if task.protocol == "cloze":  # a letter's length says nothing: no normalized scores
            metrics.update(acc_norm=norm_correct / n, acc_token_mean=mean_correct / n)
        if task.circular:
            metrics["acc_vanilla"] = first_correct / n
        metrics["margin"] = sum(s.margin for s in out) / n
        metrics.update(shares)  # per category
        if self.objective == "unsupervised":
            metrics[CONFIDENCE] = _confidence(out)
        return metrics, out

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, model: torch.nn.Module, *, tasks: Sequence[str] | None = None,
                 start: int = 0, stop: int | None = None,
                 fractions: tuple[float, float] | None = None,
                 progress: bool = False) -> EvalResult:
        """Score `model` (as it is now) on items [start:stop) of each task's subset.

        `fractions=(a, b)` instead takes each task's own share: items [ceil(a·n):ceil(b·n)) of
        a task with n items (so that a rung of a quarter costs a quarter of every task).

        Tasks whose slice is empty are left out; an objective averages the tasks it has
        (weights renormalized) and is left out when it has none.

        Example:
            >>> result = evaluator.evaluate(model, start=0, stop=16)  # doctest: +SKIP
            >>> result.metrics["demo_color_shape_val"]["acc"]  # doctest: +SKIP
            0.875
        """
        names = list(self.tasks) if tasks is None else list(tasks)
        for n in names:
            if n not in self.tasks:
                raise EvalError(f"unknown task {n!r} (known: {', '.join(self.tasks)})")
        if fractions is not None:
            a, b = fractions
            if not 0 <= a <= b <= 1:
                raise EvalError(f"fractions must satisfy 0 <= a <= b <= 1, got {fractions}")
            slices = {n: self._subsets[n][math.ceil(a * len(self._subsets[n])):
                                          math.ceil(b * len(self._subsets[n]))] for n in names}
        else:
            slices = {n: self._subsets[n][start:stop] for n in names}
        slices = {n: s for n, s in slices.items() if s}
        if not slices:
            where = f"fractions {fractions}" if fractions is not None else f"[{start}:{stop})"
            raise EvalError(f"empty subset: no task has items in {where} ({', '.join(names)})")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(s) for s in slices.values()), desc="eval", unit="item")
        t_all = time.perf_counter()
        identity = self.identity()
        result = EvalResult(metrics={}, objectives={}, tasks={n: identity[n] for n in slices})
        was_training = model.training
        model.eval()
        try:
            for n, positions in slices.items():
                task = self.tasks[n]
                if task.kind == "lm_eval":
                    continue
                t0 = time.perf_counter()
                result.metrics[n], result.items[n] = self._image_task(model, task, positions, bar)
                result.seconds[n] = time.perf_counter() - t0
            lm_names = [n for n in slices if self.tasks[n].kind == "lm_eval"]
            if lm_names:
                self._lm_tasks(model, lm_names, slices, result, bar)
        finally:
            model.train(was_training)
            if bar is not None:
                bar.close()
        result.seconds["total"] = time.perf_counter() - t_all
        result.objectives = self.objective_values(
            {t: m[self._objective_metric(self.tasks[t])] for t, m in result.metrics.items()})
        return result

    def identity(self) -> dict[str, str]:
        """Each task's identity, as logged beside its scores: version, kind, scoring protocol
        (`cloze`, `mmbench` or `mmbench-circular`), prompt style (`chat` template or `plain`)
        and, for image tasks, a digest of the exact prompts the model is shown (every rotation's
        under CircularEval), so that scores from different protocols or prompts are never
        compared by accident.

        Example:
            >>> evaluator.identity()["demo_color_shape_val"]  # doctest: +SKIP
            'v1 image_choice cloze plain prompts:3f0c2a9b1d4e'
        """
        if self._identity is None:
            self._identity = {}
            for name, task in self.tasks.items():
                if task.kind == "lm_eval":
                    assert self._lmeval is not None and task.lm_eval_task is not None
                    digest = self._lmeval.prompt_digest(task.lm_eval_task)
                    self._identity[name] = (f"v{task.version} lm_eval:{task.lm_eval_task} "
                                            f"prompts:{digest}")
                    continue
                prompts = [image_prompt(self.processor, variant.text,
                                        chat_template=task.chat_template)
                           for i in self._subsets[name] for variant in task.variants(task.items[i])]
                chat = task.chat_template is not False and bool(
                    getattr(self.processor, "chat_template", None))
                digest = hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:12]
                self._identity[name] = (f"v{task.version} {task.kind} {task.protocol_name} "
                                        f"{'chat' if chat else 'plain'} prompts:{digest}")
        return self._identity

    def objective_values(self, primary: Mapping[str, float]) -> dict[str, float]:
        """Each objective from task name → primary metric: the weighted mean of its tasks.

        Tasks missing from `primary` are left out (weights renormalized); an objective with
        none of its tasks is left out. The one place objectives are computed.
        """
        values: dict[str, float] = {}
        for obj, weights in self.objectives.items():
            present = {t: w for t, w in weights.items() if t in primary}
            total = sum(present.values())
            if present and total > 0:
                values[obj] = sum(w * primary[t] for t, w in present.items()) / total
        return values

    def joined(self, parts: Sequence[EvalResult]) -> tuple[dict[str, float], dict[str, float]]:
        """Objective values and task metrics (`TASK.METRIC`) over the items of several
        evaluations of one model taken together (a trial's rungs so far).

        An image task reports its primary metric, the share of its items answered right (and
        per category, `acc/<category>`, where its items have categories); an
        lm-eval task every metric of the task, aggregated by lm-eval over all its documents so
        far as `lm_eval.simple_evaluate` would over the same documents.

        Example:
            >>> values, metrics = evaluator.joined([rung0, rung1])  # doctest: +SKIP
        """
        items: dict[str, list[ItemScore]] = {}
        for part in parts:
            for task, scores in part.items.items():
                items.setdefault(task, []).extend(scores)
        primary: dict[str, float] = {}
        metrics: dict[str, float] = {}
        for name, scores in items.items():
            task = self.tasks[name]
            if task.kind == "lm_eval":
                assert self._lmeval is not None and task.lm_eval_task is not None
                ordered = sorted(scores, key=lambda s: s.index)  # lm-eval's order: by document
                found = self._lmeval.aggregate(task.lm_eval_task, [s.values for s in ordered])
            else:
                found = _image_accuracy(task, scores)
            if self.objective == "unsupervised":
                found[CONFIDENCE] = _confidence(scores)
            primary[name] = found[self._objective_metric(task)]
            metrics.update({f"{name}.{m}": v for m, v in found.items()})
        return self.objective_values(primary), metrics

    def estimate(self, parts: Sequence[EvalResult]) -> dict[str, tuple[float, float]]:
        """Each objective's value over its tasks' whole subsets, estimated from the items of
        `parts` (a fixed share of every task, e.g. a trial's first rung), with a standard error.

        Per task, the mean of the items' own values (`ItemScore.value`; `item_confidence` under
        the unsupervised objective) and the standard error of a mean of n items drawn without
        replacement from the task's N (finite-population factor (N − n)/(N − 1)), its variance
        that of a Bernoulli of add-one-smoothed mean p̃ = (Σx + 1)/(n + 2) (the largest for values
        in [0, 1], and not zero when all n items agree; values outside [0, 1]: the sample
        variance). Rungs take each task's seeded subset in order, so a rung is a random sample
        of it where the task sets `subset`. An objective combines its tasks' as
        `objective_values` does, errors in quadrature. An objective with a task whose items have
        no value of their own (a perplexity) is left out.

        Example:
            >>> evaluator.estimate([rung0])["combined"]  # doctest: +SKIP
            (0.71, 0.05)
        """
        items: dict[str, list[ItemScore]] = {}
        for part in parts:
            for task, scores in part.items.items():
                items.setdefault(task, []).extend(scores)
        per_task: dict[str, tuple[float, float]] = {}
        for name, scores in items.items():
            if self.objective == "unsupervised":
                values = [item_confidence(s.scores) for s in scores]
            else:
                values = [s.value for s in scores]
            if not values or any(v is None for v in values):
                continue
            n, big_n = len(values), max(len(self._subsets[name]), len(values))
            mean = sum(values) / n
            if all(0.0 <= v <= 1.0 for v in values):
                p = (sum(values) + 1) / (n + 2)
                var = p * (1 - p)
            else:  # another scale (an lm-eval metric): the sample variance
                var = (sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1
                       else math.inf)
            fpc = (big_n - n) / (big_n - 1) if big_n > 1 else 0.0
            per_task[name] = mean, var / n * fpc if fpc else 0.0
        out: dict[str, tuple[float, float]] = {}
        for obj, weights in self.objectives.items():
            present = {t: w for t, w in weights.items() if t in items}
            total = sum(present.values())
            if not present or total <= 0 or any(t not in per_task for t in present):
                continue
            value = sum(w * per_task[t][0] for t, w in present.items()) / total
            var = sum((w / total) ** 2 * per_task[t][1] for t, w in present.items())
            out[obj] = value, math.sqrt(var)
        return out

    def _lm_tasks(self, model: torch.nn.Module, names: list[str], slices: dict[str, list[int]],
                  result: EvalResult, bar: Any) -> None:
        """lm-eval's scores of our lm-eval tasks; tasks that name one lm-eval task (e.g. with
        different primary metrics) share one run over the union of their documents."""
        assert self._lmeval is not None
        t0 = time.perf_counter()
        docs: dict[str, set[int]] = {}
        for n in names:
            docs.setdefault(str(self.tasks[n].lm_eval_task), set()).update(slices[n])
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        outputs = self._lmeval.run(model, tokenizer, {lm: sorted(d) for lm, d in docs.items()})
        spent = time.perf_counter() - t0
        for n in names:
            task = self.tasks[n]
            lm, metric = str(task.lm_eval_task), task.primary_metric
            out = outputs[lm]
            by_doc: dict[int, list[dict[str, Any]]] = {}
            for s in out.samples:  # one logged sample per document and filter
                by_doc.setdefault(int(s["doc_id"]), []).append(s)
            mine = sorted(slices[n])
            result.metrics[n] = self._lmeval.aggregate(lm, [out.values[d] for d in mine])
            if metric not in result.metrics[n]:
                raise EvalError(f"{task.path}: lm-eval task {lm!r} reports no metric {metric!r} "
                                f"(has {', '.join(result.metrics[n])})")
            result.items[n] = [
                ItemScore(task=n, **self._lmeval.item_record(lm, by_doc[d], metric, out.values[d]))
                for d in mine]
            if self.objective == "unsupervised":
                result.metrics[n][CONFIDENCE] = _confidence(result.items[n])
            # lm-eval runs all its tasks in one call: share its time by item count
            result.seconds[n] = spent * len(slices[n]) / sum(len(slices[m]) for m in names)
            if bar is not None:
                bar.update(len(slices[n]))


def eval_config(eval_node: Mapping[str, Any], *, device: str, test: bool = False
                ) -> dict[str, Any]:
    """The `eval` config node as `Evaluator.from_config` takes it: the validation (or, with
    `test`, the held-out) tasks and objectives, task paths resolved by `paths.project_path`.

    Example:
        >>> eval_config({"tasks": ["evals/demo"], "objectives": {}}, device="cpu")["device"]
        'cpu'
    """
    from vlmexp.paths import project_path

    tasks = list(eval_node.get("test_tasks" if test else "tasks") or [])
    return {"tasks": [str(project_path(t)) for t in tasks],
            "objectives": eval_node.get("test_objectives" if test else "objectives") or {},
            "batch_size": eval_node.get("batch_size", 16), "device": device,
            # the held-out report is always scored against the answers
            "objective": "labelled" if test else eval_node.get("objective", "labelled")}
