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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmexp.errors import EvalError


@dataclass
class LmEvalOutput:
    """One task's result: its metrics and per-document records (doc id, choice scores, ...)."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]]


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
    """HFLM without its per-request progress bars (a search calls it hundreds of times)."""
    from lm_eval.models.huggingface import HFLM

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

        def generate_until(self, requests: Any, disable_tqdm: bool = True) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _resolve(value: Any, folder: Path) -> Any:
    """Data file paths relative to a task YAML's folder, made absolute (lm-eval leaves them to the cwd)."""
    if isinstance(value, str):
        candidate = folder / value
        return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.exists() else value
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
        where = where or {}
        paths = [str(p) for p in dict.fromkeys(map(str, include_paths))]
        manager = TaskManager(include_path=paths or None, include_defaults=False)
        missing = [n for n in task_names if n not in manager.all_tasks]
        if missing:  # not local: look among lm-eval's own tasks (a few seconds to index)
            manager = TaskManager(include_path=paths or None, include_defaults=True)
            unknown = [n for n in task_names if n not in manager.all_tasks]
            if unknown:
                at = where.get(unknown[0], "lm-eval")
                raise EvalError(f"{at}: unknown lm-eval task {unknown[0]!r}")
        try:
            loaded = manager.load_task_or_group([_spec(manager, n, paths) for n in task_names])
        except Exception as err:  # lm-eval raises many types for bad task YAMLs or data
            raise EvalError(f"lm-eval could not load {', '.join(task_names)}: {type(err).__name__}: {err}") from err
        self.task_dict = loaded
        self.tasks: dict[str, Any] = {}
        for name in task_names:
            obj = loaded.get(name)
            if obj is None or not hasattr(obj, "eval_docs"):
                raise EvalError(f"{where.get(name, 'lm-eval')}: {name!r} is an lm-eval group, not a task")
            self.tasks[name] = obj
        self._lm: Any = None
        self._lm_model: torch.nn.Module | None = None

    def num_docs(self, name: str) -> int:
        return len(self.tasks[name].eval_docs)

    def _lm_for(self, model: torch.nn.Module, tokenizer: Any) -> Any:
        if self._lm is None or self._lm_model is not model:
            self._lm = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size,
                            device=self.device, backend="causal")
            self._lm_model = model
        return self._lm

    def run(self, model: torch.nn.Module, tokenizer: Any, samples: dict[str, list[int]]) -> dict[str, LmEvalOutput]:
        """Evaluate `model` on the given documents of each task (doc indices into `eval_docs`)."""
        from lm_eval.evaluator import evaluate

        names = [n for n, idx in samples.items() if idx]
        if not names:
            return {}
        lm = self._lm_for(model, tokenizer)
        was_training = model.training
        model.eval()
        try:
            res = evaluate(
                lm=lm, task_dict={n: self.tasks[n] for n in names},
                samples={n: sorted(samples[n]) for n in names},
                bootstrap_iters=0, log_samples=True,
            )
        finally:
            model.train(was_training)
        out = {}
        for n in names:
            metrics = {}
            for key, value in res["results"][n].items():
                metric, _, filt = key.partition(",")
                if filt and "stderr" not in metric and isinstance(value, (int, float)):
                    metrics[metric] = float(value)
            out[n] = LmEvalOutput(metrics, list(res["samples"][n]))
        return out

    def item_record(self, name: str, sample: dict[str, Any], metric: str) -> dict[str, Any]:
        """A logged lm-eval sample as (index, chosen, answer, correct, margin, scores)."""
        task = self.tasks[name]
        doc = sample["doc"]
        correct = bool(sample.get(metric, 0))
        if getattr(task, "OUTPUT_TYPE", "") == "multiple_choice":
            choices = [str(c) for c in task.doc_to_choice(doc)]
            scores = [float(r[0]) for r in sample["filtered_resps"]]
            target = sample["target"]
            gold = target if isinstance(target, int) else choices.index(str(target))
            best = max(range(len(scores)), key=scores.__getitem__)
            others = [s for i, s in enumerate(scores) if i != gold]
            margin = scores[gold] - max(others) if others else math.nan
            return dict(index=int(sample["doc_id"]), chosen=choices[best], answer=choices[gold],
                        correct=correct, margin=margin, scores=scores)
        return dict(index=int(sample["doc_id"]), chosen=str(sample["filtered_resps"][0]),
                    answer=str(sample["target"]), correct=correct, margin=math.nan, scores=[])
