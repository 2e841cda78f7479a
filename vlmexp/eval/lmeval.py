"""Text benchmarks through lm-eval, on the live in-memory model (no copy, no reload).

The task manager and lm-eval's task objects (with their documents) are built once per
`LmEvalRunner`; the `HFLM` wrapper is built once per model object and reused while the same object
is passed (the merge engine mutates it in place, so every call sees the current weights). Nothing
is cached across calls: each call re-runs the model on the requested documents.

lm-eval's own `limit` takes the first N documents; the seeded subset is passed as `samples=`
(sorted, because lm-eval maps its positions back to document ids through that list's order).

Every supported VLM class serves lm-eval's text-only requests as it is: passed as `pretrained`,
HFLM picks the causal backend and calls `model(input_ids).logits`. Without image inputs Qwen-VL
falls back to 1-D text positions and needs no `mm_token_type_ids`. PaliGemma is the exception:
without `token_type_ids` it is not causal (a later token changes earlier logits), so HFLM's model
call is overridden to pass `token_type_ids=1` (all "suffix", causal) — `text_only_inputs`.

Scores are lm-eval's own: each document keeps lm-eval's per-sample value of every metric of
its task (`acc` 0/1, `acc_norm`, `exact_match`, a perplexity's (log-likelihood, words) pair, an
f1's (gold, prediction) pair), and `LmEvalRunner.aggregate` folds any set of documents with the
task's own `aggregation()` functions, in document order, as `lm_eval.simple_evaluate` does.
A metric is named as lm-eval names it, with its filter after a slash when the task has
several filters (`exact_match/strict-match`). A NaN or inf in a model's log-likelihood or
next-token logits, in a per-sample value or in an aggregate is an `EvalError` naming the task
and the document: a broken model never gets a score.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmexp.errors import EvalError


@dataclass
class LmEvalOutput:
    """One task's result on some documents.

    `metrics`: each metric aggregated over them (`LmEvalRunner.aggregate`); `samples`: lm-eval's
    logged samples (one per document and filter); `values`: doc id → metric → lm-eval's
    per-sample value, the input of the aggregation.
    """

    metrics: dict[str, float]
    samples: list[dict[str, Any]]
    values: dict[int, dict[str, Any]]


class _NonFinite(Exception):
    """Raised inside HFLM: the requests of task `task_name` at position `position` of its
    documents gave non-finite next-token logits (`what`)."""

    def __init__(self, task_name: str, position: int, what: str) -> None:
        super().__init__(what)
        self.task_name, self.position, self.what = task_name, position, what


def non_finite(value: Any) -> float | None:
    """The first NaN or inf inside a per-sample value (a number, a tuple or array of them), or
    None when every number in it is finite (strings and other leaves are not numbers).

    Example:
        >>> non_finite((-3.5, 4)), non_finite([1.0, float("nan")]), non_finite("three")
        (None, nan, None)
    """
    if isinstance(value, bool | str | bytes) or value is None:
        return None
    if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        number = float(value)
        return None if math.isfinite(number) else number
    if hasattr(value, "tolist"):  # numpy / torch arrays
        return non_finite(value.tolist())
    if isinstance(value, list | tuple):
        for v in value:
            bad = non_finite(v)
            if bad is not None:
                return bad
    return None


def _word(number: float) -> str:
    return "NaN" if math.isnan(number) else ("inf" if number > 0 else "-inf")


def _quiet() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.models.huggingface", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # lm-eval draws a "building requests" bar per task per call and offers no switch for it;
    # a search calls it once per trial, so that module's tqdm is made silent.
    import functools

    import datasets
    import lm_eval.api.task
    from tqdm import tqdm

    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)
    datasets.disable_progress_bars()


def text_only_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Extra inputs a VLM needs to act as a plain causal LM on text (none for most).

    PaliGemma attends bidirectionally unless told otherwise: token_type_ids = 1 makes every
    token a causal "suffix" token. (Gemma 3 must not get them: 1 there marks image tokens.)
    """
    if getattr(getattr(model, "config", None), "model_type", "") == "paligemma":
        return {"token_type_ids": torch.ones_like(input_ids)}
    return {}


def _hflm_class() -> type:
    """HFLM without its per-request progress bars (a search calls it hundreds of times), that
    stops a generation whose next-token logits are NaN or inf (greedy decoding would otherwise
    turn them into some token and the document into a plain wrong answer)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import LogitsProcessor, LogitsProcessorList

    class FiniteLogits(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            nan, inf = scores.isnan().any(-1), scores.isposinf().any(-1) | scores.isneginf().all(-1)
            bad = nan | inf
            if bad.any():
                row = int(bad.nonzero()[0, 0])
                word = "NaN" if nan[row] else "inf"
                raise _NonFinite("", row, f"the model's next-token logits are {word} while generating")
            return scores

    class QuietHFLM(HFLM):
        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            extra = text_only_inputs(self.model, inps)
            if not extra or attn_mask is not None:
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad():
                return self.model(inps, **extra).logits

        def loglikelihood(self, requests: Any, disable_tqdm: bool = True) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = True) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any) -> Any:
            self._batch_contexts = list(strings)  # which request a bad generation row was
            return super().tok_batch_encode(strings, *args, **kwargs)

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                            **generation_kwargs: Any) -> torch.Tensor:
            processors = LogitsProcessorList(generation_kwargs.pop("logits_processor", None) or [])
            processors.append(FiniteLogits())
            return super()._model_generate(context, max_length, stop,
                                           logits_processor=processors, **generation_kwargs)

        def generate_until(self, requests: Any, disable_tqdm: bool = True) -> Any:
            try:
                return super().generate_until(requests, disable_tqdm=True)
            except _NonFinite as err:
                context = self._batch_contexts[err.position]
                req = next(r for r in requests if r.args[0] == context)
                raise _NonFinite(req.task_name, req.doc_id, err.what) from None

    return QuietHFLM


def _resolve(value: Any, folder: Path) -> Any:
    """Data file paths relative to a task YAML's folder, made absolute (lm-eval leaves them to
    the working directory, where a file of the same name would be read silently). A path that
    does not exist there is an EvalError naming it."""
    if isinstance(value, str):
        if Path(value).is_absolute() or "://" in value:
            return value
        candidate = (folder / value).resolve()
        if not candidate.exists() and not any(c in value for c in "*?["):
            raise EvalError(f"{folder}: data file {value!r} not found (looked for {candidate})")
        return str(candidate)
    if isinstance(value, dict):
        return {k: _resolve(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, folder) for v in value]
    return value


def _spec(manager: Any, name: str, include_paths: Sequence[str]) -> str | dict[str, Any]:
    """A task of ours (under an include path) as a full config dict with absolute data paths."""
    from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval's own factory uses

    entry = manager.task_index.get(name)
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is None or not any(
        Path(yaml_path).resolve().is_relative_to(Path(p).resolve()) for p in include_paths
    ):
        return name
    cfg = load_yaml(yaml_path, resolve_func=True)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    for key in ("data_files", "data_dir"):
        if key in kwargs:
            kwargs[key] = _resolve(kwargs[key], Path(yaml_path).parent)
    cfg["dataset_kwargs"] = kwargs
    cfg["task"] = name
    return cfg


class LmEvalRunner:
    """Runs lm-eval tasks (by name) on an in-memory model.

    Example:
        >>> runner = LmEvalRunner(["demo_next_item_val"], include_paths=["evals/demo/lm_eval"])  # doctest: +SKIP
        >>> out = runner.run(model, tokenizer, {"demo_next_item_val": [0, 3, 5]})  # doctest: +SKIP
        >>> out["demo_next_item_val"].metrics["acc"]  # doctest: +SKIP
        0.3333333333333333
    """

    def __init__(self, task_names: Sequence[str], *, include_paths: Sequence[str | Path] = (),
                 batch_size: int = 16, device: str = "cpu", where: dict[str, str] | None = None) -> None:
        _quiet()
        from lm_eval.tasks import TaskManager

        self.batch_size = batch_size
        self.device = device
        self.where = where = dict(where or {})
        paths = [str(p) for p in dict.fromkeys(map(str, include_paths))]
        manager = TaskManager(include_path=paths or None, include_defaults=False)
        missing = [n for n in task_names if n not in manager.all_tasks]
        if missing:  # not local: look among lm-eval's own tasks (a few seconds to index)
            manager = TaskManager(include_path=paths or None, include_defaults=True)
            unknown = [n for n in task_names if n not in manager.all_tasks]
            if unknown:
                at = where.get(unknown[0], "lm-eval")
                raise EvalError(f"{at}: unknown lm-eval task {unknown[0]!r}")
        specs = [_spec(manager, n, paths) for n in task_names]  # our own errors first
        try:
            loaded = manager.load_task_or_group(specs)
        except Exception as err:  # lm-eval raises many types for bad task YAMLs or data
            raise EvalError(f"lm-eval could not load {', '.join(task_names)}: {type(err).__name__}: {err}") from err
        self.tasks: dict[str, Any] = {}
        for name in task_names:
            obj = loaded.get(name)
            if obj is None or not hasattr(obj, "eval_docs"):
                raise EvalError(f"{where.get(name, 'lm-eval')}: {name!r} is an lm-eval group, not a task")
            self.tasks[name] = obj
            # checked inside lm-eval's loop, before lm-eval aggregates (a NaN would pass into
            # its aggregate, an inf overflow it), where the document is still known
            obj.process_results = self._checked(name, obj.process_results)
        self._asked: dict[str, list[int]] = {}  # the documents of the current run
        self._seen: dict[str, list[dict[str, Any]]] = {}  # their per-sample values so far
        self._lm: Any = None
        self._lm_model: torch.nn.Module | None = None

    def _checked(self, name: str, process_results: Any) -> Any:
        """The task's `process_results`, raising EvalError at a NaN or inf in the model's
        numbers for a document or in its per-sample values."""

        def process(doc: Any, results: Sequence[Any]) -> dict[str, Any]:
            for i, resp in enumerate(results):
                bad = non_finite(resp)
                if bad is not None:
                    raise self._non_finite(name, self._doc_id(name, doc),
                                           f"the model's log-likelihood of request {i} is {_word(bad)}")
            out = process_results(doc, results)
            for metric, value in out.items():
                bad = non_finite(value)
                if bad is not None:
                    raise self._non_finite(name, self._doc_id(name, doc), f"{metric} is {_word(bad)}")
            self._seen.setdefault(name, []).append(out)
            return out

        return process

    def _doc_id(self, name: str, doc: Any) -> int | str:
        """Which document `doc` is (looked up only to name it in an error)."""
        docs = self.tasks[name].eval_docs
        asked = self._asked.get(name) or range(len(docs))
        return next((i for i in asked if docs[i] == doc), "?")

    def prompt_digest(self, name: str) -> str:
        """A digest of what decides how lm-eval prompts and scores task `name`: its prompt
        fields, delimiters, few-shot count, output type, metrics and version, and lm-eval's
        own version (not where its data lies, which differs between machines)."""
        import hashlib
        import json

        import lm_eval

        config = self.tasks[name].config
        keys = ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice",
                "target_delimiter", "fewshot_delimiter", "num_fewshot", "generation_kwargs",
                "metric_list", "filter_list", "metadata")
        fields = {k: getattr(config, k, None) for k in keys}
        fields["lm_eval"] = getattr(lm_eval, "__version__", "?")
        text = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def num_docs(self, name: str) -> int:
        return len(self.tasks[name].eval_docs)

    def _lm_for(self, model: torch.nn.Module, tokenizer: Any) -> Any:
        if self._lm is None or self._lm_model is not model:
            self._lm = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size,
                            device=self.device, backend="causal")
            self._lm_model = model
        return self._lm

    def metrics(self, name: str) -> dict[str, str]:
        """The task's metrics as this runner names them → lm-eval's metric name (the key of its
        `aggregation()` and `higher_is_better()`).

        Example:
            >>> runner.metrics("example_next_item")  # doctest: +SKIP
            {'acc': 'acc'}
        """
        task = self.tasks[name]
        filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        names = dict.fromkeys([*task.aggregation(), *task.higher_is_better()])
        return {_metric_key(m, f, filters): m for f in filters for m in names}

    def higher_is_better(self, name: str) -> dict[str, bool | None]:
        """Each metric's direction, as the task declares it (None: it declares none)."""
        declared = self.tasks[name].higher_is_better()
        return {key: declared.get(metric) for key, metric in self.metrics(name).items()}

    def aggregate(self, name: str, values: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Each metric over the given documents' per-sample values (in the order given: pass
        them in document order, as lm-eval aggregates), by the task's own `aggregation()`
        function (lm-eval's fallback, the mean, where it declares none).

        Raises EvalError when an aggregate is NaN or inf (e.g. a perplexity that overflows).

        Example:
            >>> runner.aggregate("example_next_item", [{"acc": 1.0}, {"acc": 0.0}])  # doctest: +SKIP
            {'acc': 0.5}
        """
        from lm_eval.api.metrics import mean

        functions = self.tasks[name].aggregation()
        by_key = self.metrics(name)
        keys = dict.fromkeys(k for v in values for k in v)
        out: dict[str, float] = {}
        for key in keys:
            items = [v[key] for v in values if key in v]
            metric = by_key.get(key, key)
            where = f"{self.where.get(name, 'lm-eval')}: lm-eval task {name!r}: {key} over {len(items)} documents"
            try:
                value = functions.get(metric, mean)(items)
            except OverflowError:  # math.exp of a huge mean negative log-likelihood
                value = math.inf
            except (ArithmeticError, ValueError) as err:
                raise EvalError(f"{where}: {type(err).__name__}: {err}") from err
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue  # not a number (e.g. a passthrough): not a score
            if not math.isfinite(number):
                raise EvalError(f"{where} is {_word(number)}")
            out[key] = number
        return out

    def run(self, model: torch.nn.Module, tokenizer: Any, samples: dict[str, list[int]]) -> dict[str, LmEvalOutput]:
        """Evaluate `model` on the given documents of each task (doc indices into `eval_docs`).

        Raises EvalError naming the task and the document when a log-likelihood, a next-token
        logit or a per-sample value is NaN or inf.
        """
        from lm_eval.evaluator import evaluate

        names = [n for n, idx in samples.items() if idx]
        if not names:
            return {}
        docs = {n: sorted(samples[n]) for n in names}
        lm = self._lm_for(model, tokenizer)
        was_training = model.training
        model.eval()
        self._asked, self._seen = docs, {}
        try:
            res = evaluate(lm=lm, task_dict={n: self.tasks[n] for n in names}, samples=docs,
                           bootstrap_iters=0, log_samples=True)
        except _NonFinite as err:  # err.position: the document's place among those asked for
            ids = docs.get(err.task_name)
            doc = ids[err.position] if ids and 0 <= err.position < len(ids) else err.position
            raise self._non_finite(err.task_name, doc, err.what) from None
        except ArithmeticError as err:  # lm-eval's own aggregate overflowed: say which
            for n in names:
                self.aggregate(n, self._seen.get(n, []))
            raise EvalError(f"lm-eval tasks {', '.join(names)}: an aggregate failed: "
                            f"{type(err).__name__}: {err}") from err
        finally:
            model.train(was_training)
            self._asked, self._seen = {}, {}
        out = {}
        for n in names:
            logged = list(res["samples"][n])
            values = self._values(n, logged)
            metrics = self.aggregate(n, [values[d] for d in sorted(values)])
            out[n] = LmEvalOutput(metrics, logged, values)
        return out

    def _non_finite(self, name: str, doc: int, what: str) -> EvalError:
        return EvalError(f"{self.where.get(name, 'lm-eval')}: lm-eval task {name!r}, document {doc}: {what}")

    def _values(self, name: str, logged: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """doc id → metric → per-sample value (checked finite as lm-eval made them)."""
        filters = [f.name for f in getattr(self.tasks[name], "_filters", [])] or ["none"]
        values: dict[int, dict[str, Any]] = {}
        for sample in logged:
            doc = int(sample["doc_id"])
            for metric in sample["metrics"]:
                key = _metric_key(metric, str(sample.get("filter", "none")), filters)
                values.setdefault(doc, {})[key] = sample[metric]
        return values

    def item_record(self, name: str, samples: Sequence[Mapping[str, Any]], metric: str,
                    values: Mapping[str, Any]) -> dict[str, Any]:
        """One document's record for `ItemScore`, from its logged samples (one per filter) and
        its per-sample `values` (`LmEvalOutput.values`); `metric` is the task's primary metric.

        `correct`: multiple choice, the best-scoring choice is the gold one; otherwise the
        primary metric gave full credit. `value`: the primary metric's per-sample value where the
        task aggregates it by a mean (items then compare one by one), else None (perplexities,
        f1, bleu, mcc: only the aggregate means something).
        """
        from lm_eval.api.metrics import mean

        task = self.tasks[name]
        sample = samples[0]
        doc = sample["doc"]
        own = values.get(metric)
        function = task.aggregation().get(self.metrics(name).get(metric, metric), mean)
        value = float(own) if function is mean and isinstance(own, numbers.Real) else None
        record = dict(index=int(sample["doc_id"]), value=value, values=dict(values))
        if getattr(task, "OUTPUT_TYPE", "") == "multiple_choice":
            choices = [str(c) for c in task.doc_to_choice(doc)]
            scores = [float(r[0]) for r in sample["filtered_resps"]][:len(choices)]
            target = sample["target"]
            gold = target if isinstance(target, int) else choices.index(str(target))
            best = max(range(len(scores)), key=scores.__getitem__)
            others = [s for i, s in enumerate(scores) if i != gold]
            margin = scores[gold] - max(others) if others else math.nan
            return dict(record, chosen=choices[best], answer=choices[gold], correct=best == gold,
                        margin=margin, scores=scores)
        resp = sample["filtered_resps"][0]
        numeric = isinstance(resp, int | float) and not isinstance(resp, bool)
        return dict(record, chosen="" if numeric else str(resp), answer=str(sample["target"]),
                    correct=value is not None and value >= 1.0, margin=math.nan,
                    scores=[float(resp)] if numeric else [])


def _metric_key(metric: str, filter_name: str, filters: Sequence[str]) -> str:
    """A metric's name: lm-eval's, with the filter after a slash when the task has several."""
    return metric if len(filters) == 1 else f"{metric}/{filter_name}"
