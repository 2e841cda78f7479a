"""lm-eval on the live in-memory model: every architecture, in-place changes, seeded subsets."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from vlmexp.errors import EvalError
from vlmexp.eval.lmeval import LmEvalRunner, text_only_inputs
from vlmexp.zoo.tiny import VLMS

EXAMPLES = Path(__file__).resolve().parents[1] / "evals" / "examples"
TASK = "example_next_item"
DOCS = [json.loads(x) for x in (EXAMPLES / "lm_eval" / "next_item.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runner():
    return LmEvalRunner([TASK], include_paths=[EXAMPLES / "lm_eval"], batch_size=4)


def _reference(model, tok, context: str, choice: str) -> float:
    """Causal log p(" " + choice | context), tokenized as lm-eval does (whole, then split)."""
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + " " + choice, add_special_tokens=False)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(input_ids=ids, **text_only_inputs(model, ids)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.parametrize("name", VLMS)
def test_loglikelihoods_match_causal_reference(name, runner, tiny, tiny_processor):
    model, tok = tiny(name), tiny_processor(name).tokenizer
    docs = [1, 4, 5, 7]
    out = runner.run(model, tok, {TASK: docs})[TASK]
    assert sorted(s["doc_id"] for s in out.samples) == docs
    right = []
    for sample in out.samples:
        doc = DOCS[sample["doc_id"]]
        assert sample["doc"] == doc
        got = [r[0] for r in sample["filtered_resps"]]
        want = [_reference(model, tok, doc["context"], c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
        # acc from the reference log-likelihoods: argmax (first of equals) is the gold label
        right.append(max(range(len(want)), key=want.__getitem__) == doc["label"])
    assert out.metrics["acc"] == sum(right) / len(docs)


def test_paligemma_text_needs_token_types(tiny):
    """Without token_type_ids PaliGemma is not causal: a later token changes earlier logits."""
    model = tiny("paligemma")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        bare = model(input_ids=ids).logits[0, :4] - model(input_ids=ids[:, :4]).logits[0]
        causal = (model(input_ids=ids, **text_only_inputs(model, ids)).logits[0, :4]
                  - model(input_ids=ids[:, :4], **text_only_inputs(model, ids[:, :4])).logits[0])
    assert bare.abs().max() > 1e-4
    assert causal.abs().max() == 0
    assert text_only_inputs(tiny("gemma3"), ids) == {}


def test_sees_in_place_weight_changes(runner, tiny, tiny_processor):
    model = copy.deepcopy(tiny("llava"))
    tok = tiny_processor("llava").tokenizer
    docs = {TASK: [0, 2, 5]}

    def logliks():
        out = runner.run(model, tok, docs)[TASK]
        return [r[0] for s in out.samples for r in s["filtered_resps"]]

    before = logliks()
    lm = runner._lm
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head.mul_(3.0)
    scaled = logliks()
    assert runner._lm is lm  # the same HFLM, no reload
    assert max(abs(a - b) for a, b in zip(before, scaled, strict=True)) > 1e-3
    with torch.no_grad():
        head.div_(3.0)
    assert logliks() == pytest.approx(before, abs=1e-5)


def test_unknown_task_is_an_error():
    with pytest.raises(EvalError, match="unknown lm-eval task 'no_such_task_xyz'") as err:
        LmEvalRunner(["no_such_task_xyz"], include_paths=[EXAMPLES / "lm_eval"],
                     where={"no_such_task_xyz": "evals/x.yaml"})
    assert str(err.value).startswith("evals/x.yaml: ")


# ---------------------------------------------------------------------- lm-eval's own scores

CHOICE_DOCS = [  # choices of different lengths, so that acc and acc_norm disagree
    {"context": "one two", "choices": ["three", "six", "eight four"], "label": 0},
    {"context": "two three", "choices": ["seven", "nine", "four"], "label": 2},
    {"context": "three four", "choices": ["ten", "five five", "eight"], "label": 1},
    {"context": "red green", "choices": ["blue", "shape", "colour"], "label": 0},
    {"context": "a b c", "choices": ["d", "e f g", "z"], "label": 0},
    {"context": "What comes next? one", "choices": ["two", "nine", "Answer"], "label": 0},
]
QUESTIONS = ["one two", "a b c", "red", "What comes next?", "1 2 3", "x y"]
TEXTS = ["one two three four five", "red green blue", "What colour is the shape?",
         "a b c d e f g", "Question: What comes next? Answer: seven", "0 1 2 3 4 5 6 7 8 9"]
LM_TASKS = {  # lm-eval task YAML bodies (data_files added by `_write_tasks`)
    "t_choice": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list: [{metric: acc}, {metric: acc_norm}, {metric: mcc}]
""",
    "t_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: answer
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 4, do_sample: false}
metric_list: [{metric: exact_match}]
""",
    "t_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
}
OURS = {"choice": ("t_choice", "acc"), "choice_norm": ("t_choice", "acc_norm"),
        "choice_mcc": ("t_choice", "mcc"), "gen": ("t_gen", "exact_match"),
        "ppl": ("t_ppl", "word_perplexity")}


def _write_tasks(folder: Path, rows: dict[str, list[dict]]) -> None:
    """lm-eval task YAMLs with absolute data paths (lm-eval reads relative ones against the
    working directory), and our task YAMLs that name them."""
    lm = folder / "lm_eval"
    lm.mkdir(parents=True, exist_ok=True)
    for name, body in LM_TASKS.items():
        data = lm / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        (lm / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\n"
            f"test_split: test\n{body}metadata:\n  version: 1\n")
    for ours, (name, metric) in OURS.items():
        (folder / f"{ours}.yaml").write_text(
            f"task: {ours}\nversion: 1\nkind: lm_eval\nlm_eval_task: {name}\n"
            f"include_path: lm_eval\nmetric: {metric}\n")


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory, tiny, tiny_processor) -> Path:
    """The three lm-eval tasks; the generation task's answers are the tiny LLaVA's own greedy
    outputs for documents 0, 2 and 3 (exact matches) and other text for the rest."""
    folder = tmp_path_factory.mktemp("lm_tasks")
    rows = {"t_choice": CHOICE_DOCS, "t_ppl": [{"text": t} for t in TEXTS],
            "t_gen": [{"question": q, "answer": "?"} for q in QUESTIONS]}
    probe = folder / "probe"
    _write_tasks(probe, rows)
    runner = LmEvalRunner(["t_gen"], include_paths=[probe / "lm_eval"], batch_size=4)
    out = runner.run(tiny("llava"), tiny_processor("llava").tokenizer, {"t_gen": list(range(6))})
    said = {s["doc_id"]: s["filtered_resps"][0] for s in out["t_gen"].samples}
    rows["t_gen"] = [{"question": q, "answer": said[i] if i in (0, 2, 3) else "no such answer"}
                     for i, q in enumerate(QUESTIONS)]
    _write_tasks(folder, rows)
    return folder


def _evaluator(folder: Path, processor, objectives=None, batch_size: int = 4):
    from vlmexp.eval.evaluator import Evaluator

    cfg = {"tasks": [f"{t}.yaml" for t in OURS], "batch_size": batch_size}
    if objectives is not None:
        cfg["objectives"] = objectives
    return Evaluator.from_config(cfg, processor, base_dir=folder)


def _simple_evaluate(folder: Path, model, tokenizer, limit: int | None = None) -> dict:
    """lm-eval's own numbers: its plain HFLM and `simple_evaluate`, the first `limit` documents."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu", backend="causal")
    manager = TaskManager(include_path=str(folder / "lm_eval"), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=list(LM_TASKS), task_manager=manager, limit=limit,
                          bootstrap_iters=0)
    return {t: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
            for t, r in res["results"].items()}


@pytest.fixture(scope="module")
def lm_reference(lm_tasks, tiny, tiny_processor) -> dict:
    return _simple_evaluate(lm_tasks, tiny("llava"), tiny_processor("llava").tokenizer)


def test_every_metric_equals_simple_evaluate(lm_tasks, lm_reference, tiny, tiny_processor):
    model, processor = tiny("llava"), tiny_processor("llava")
    ev = _evaluator(lm_tasks, processor)
    full = ev.evaluate(model)
    for ours, (name, metric) in OURS.items():
        assert full.metrics[ours] == lm_reference[name], ours
        assert full.objectives[ours] == lm_reference[name][metric]
    # the numbers are the kinds the issue is about: not shares of truthy samples
    ref = lm_reference
    assert ref["t_choice"]["acc"] == 0.5 and ref["t_choice"]["acc_norm"] == pytest.approx(1 / 6)
    assert ref["t_gen"]["exact_match"] == 0.5  # documents 0, 2 and 3 match
    assert ref["t_ppl"]["word_perplexity"] > 100 and 0 < ref["t_ppl"]["bits_per_byte"] < 10
    assert ref["t_choice"]["mcc"] not in (0.0, 0.5, 1.0)
    # the first 4 documents: `limit=4` there, items [0:4) here
    head = ev.evaluate(model, stop=4)
    limited = _simple_evaluate(lm_tasks, model, processor.tokenizer, limit=4)
    for ours, (name, _) in OURS.items():
        assert head.metrics[ours] == limited[name], ours
    assert limited["t_ppl"] != lm_reference["t_ppl"]


def test_items_keep_lm_evals_per_sample_values(lm_tasks, tiny, tiny_processor):
    ev = _evaluator(lm_tasks, tiny_processor("llava"))
    result = ev.evaluate(tiny("llava"))
    ppl = result.items["ppl"]
    assert [i.index for i in ppl] == list(range(6))
    for item in ppl:
        ll, words = item.values["word_perplexity"]
        assert words == len(TEXTS[item.index].split()) and ll < 0
        assert item.values["byte_perplexity"] == (ll, len(TEXTS[item.index].encode()))
        assert item.value is None and item.scores == [ll]
    gen = result.items["gen"]
    assert [i.values["exact_match"] for i in gen] == [1, 0, 1, 1, 0, 0]
    assert [i.correct for i in gen] == [True, False, True, True, False, False]
    assert [i.value for i in gen] == [1, 0, 1, 1, 0, 0]
    for item in result.items["choice_norm"]:
        assert item.value == item.values["acc_norm"] and set(item.values) == {"acc", "acc_norm", "mcc"}
        assert item.values["mcc"] == (CHOICE_DOCS[item.index]["label"],
                                      max(range(3), key=item.scores.__getitem__))
    assert all(i.value is None for i in result.items["choice_mcc"])
    as_json = json.loads(json.dumps(result.to_json()))
    assert as_json["items"]["ppl"][0]["values"]["word_perplexity"] == list(ppl[0].values["word_perplexity"])


def test_rungs_aggregate_over_all_their_documents(lm_tasks, lm_reference, tiny, tiny_processor):
    model, processor = tiny("llava"), tiny_processor("llava")
    ev = _evaluator(lm_tasks, processor, batch_size=1)  # no padding: each request as alone
    halves = [ev.evaluate(model, fractions=(0, 0.5)), ev.evaluate(model, fractions=(0.5, 1))]
    values, metrics = ev.joined(halves)
    for ours, (name, metric) in OURS.items():
        assert values[ours] == pytest.approx(lm_reference[name][metric], rel=1e-12), ours
        for m, v in lm_reference[name].items():
            assert metrics[f"{ours}.{m}"] == pytest.approx(v, rel=1e-12), (ours, m)
    # a perplexity (or mcc) over all documents is not the mean of the halves' perplexities
    mean_of_halves = sum(h.objectives["ppl"] for h in halves) / 2
    assert abs(mean_of_halves - values["ppl"]) > 1e-3 * values["ppl"]
    # one rung alone: the same as that evaluation's own metrics
    assert ev.joined(halves[:1])[1]["ppl.word_perplexity"] == halves[0].metrics["ppl"]["word_perplexity"]


def test_objective_directions_come_from_lm_eval(lm_tasks, tiny_processor):
    processor = tiny_processor("llava")
    objectives = {"text": {"choice": 1.0, "gen": 2.0}, "ppl": {"ppl": 1.0},
                  "mcc": {"choice_mcc": 1.0}}
    ev = _evaluator(lm_tasks, processor, objectives)
    assert ev.directions() == {"text": "maximize", "ppl": "minimize", "mcc": "maximize"}
    with pytest.raises(EvalError, match=r"objective 'both' mixes .*choice \(maximize\), "
                                        r"ppl \(minimize\)"):
        _evaluator(lm_tasks, processor, {"both": {"choice": 1.0, "ppl": 1.0}})


def _overflowing(model):
    """Finite weights whose logits overflow to ±inf (log-likelihoods then NaN)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(1e30)
        model.lm_head.weight.mul_(1e30)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


@pytest.mark.parametrize(("task", "what"), [
    ("choice", r"the model's log-likelihood of request 0 is NaN"),
    ("ppl", r"the model's log-likelihood of request 0 is NaN"),
    ("gen", r"the model's next-token logits are NaN while generating"),
])
def test_non_finite_scores_fail_naming_task_and_document(task, what, lm_tasks, tiny, tiny_processor):
    ev = _evaluator(lm_tasks, tiny_processor("llava"))
    name = OURS[task][0]
    with pytest.raises(EvalError, match=rf"lm-eval task '{name}', document 3: {what}"):
        ev.evaluate(_overflowing(tiny("llava")), tasks=[task], start=3, stop=4)


def test_non_finite_aggregate_is_an_error(lm_tasks, tiny_processor):
    ev = _evaluator(lm_tasks, tiny_processor("llava"))
    runner = ev._lmeval
    with pytest.raises(EvalError, match=r"lm-eval task 't_ppl': word_perplexity over 2 documents is inf"):
        runner.aggregate("t_ppl", [{"word_perplexity": (-1e6, 1)}, {"word_perplexity": (-5.0, 2)}])
    assert runner.aggregate("t_ppl", [{"word_perplexity": (-6.0, 2)}, {"word_perplexity": (-4.0, 3)}]) \
        == {"word_perplexity": pytest.approx(math.exp(2.0))}
    # a per-sample value (here from finite log-likelihoods) is checked where lm-eval makes it
    task = runner.tasks["t_choice"]
    doc = task.eval_docs[4]
    assert task.process_results(doc, [(-1.0, False), (-2.0, False), (-3.0, False)])["acc"] == 1.0
    with pytest.raises(EvalError, match=r"'t_choice', document 4: the model's log-likelihood of "
                                        r"request 1 is -inf"):
        task.process_results(doc, [(-1.0, False), (-math.inf, False), (-3.0, False)])
    # lm-eval's own per-sample values are checked too, and its aggregate that overflows
    checked = runner._checked("t_choice", lambda doc, results: {"acc_norm": math.nan})
    with pytest.raises(EvalError, match=r"'t_choice', document 4: acc_norm is NaN"):
        checked(doc, [(-1.0, False), (-2.0, False), (-3.0, False)])


def test_overflowing_aggregate_inside_lm_eval_is_an_error(lm_tasks, tiny, tiny_processor):
    runner = LmEvalRunner(["t_ppl"], include_paths=[lm_tasks / "lm_eval"], batch_size=4)
    runner.tasks["t_ppl"].process_results = runner._checked(
        "t_ppl", lambda doc, results: {"word_perplexity": (-1e6, 1)})
    with pytest.raises(EvalError, match=r"'t_ppl': word_perplexity over 2 documents is inf"):
        runner.run(tiny("llava"), tiny_processor("llava").tokenizer, {"t_ppl": [1, 4]})


def test_several_filters_name_each_metric_by_its_filter(lm_tasks, tmp_path, tiny, tiny_processor):
    """exact_match on the raw and the stripped generation: `exact_match/raw` and
    `exact_match/stripped`, each lm-eval's `exact_match,<filter>`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = tiny("llava"), tiny_processor("llava").tokenizer
    probe = LmEvalRunner(["t_gen"], include_paths=[lm_tasks / "lm_eval"], batch_size=4)
    said = {s["doc_id"]: s["filtered_resps"][0]
            for s in probe.run(model, tok, {"t_gen": list(range(6))})["t_gen"].samples}
    data = tmp_path / "gen2.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": said[i].strip()}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    (tmp_path / "t_gen2.yaml").write_text(
        f"task: t_gen2\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\n"
        f"test_split: test\n{LM_TASKS['t_gen']}"
        "filter_list:\n"
        "  - {name: raw, filter: [{function: take_first}]}\n"
        "  - {name: stripped, filter: [{function: remove_whitespace}, {function: take_first}]}\n"
        "metadata:\n  version: 1\n")
    runner = LmEvalRunner(["t_gen2"], include_paths=[tmp_path], batch_size=4)
    assert runner.metrics("t_gen2") == {"exact_match/raw": "exact_match",
                                        "exact_match/stripped": "exact_match"}
    out = runner.run(model, tok, {"t_gen2": list(range(6))})["t_gen2"]
    unspaced = sum(said[i] == said[i].strip() for i in range(6)) / 6
    assert out.metrics == {"exact_match/raw": unspaced, "exact_match/stripped": 1.0}
    assert unspaced < 1.0
    assert out.values[0] == {"exact_match/raw": float(said[0] == said[0].strip()),
                             "exact_match/stripped": 1.0}
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", backend="causal")
    ref = simple_evaluate(model=lm, tasks=["t_gen2"], bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(tmp_path),
                                                   include_defaults=False))["results"]["t_gen2"]
    assert out.metrics == {"exact_match/raw": ref["exact_match,raw"],
                           "exact_match/stripped": ref["exact_match,stripped"]}


def test_a_missing_data_file_is_named_next_to_its_task_yaml(tmp_path, monkeypatch):
    """lm-eval reads a relative data file against the working directory; we read it next to
    the task YAML, so a same-named file in the working directory is never used instead."""
    from vlmexp.errors import EvalError
    from vlmexp.eval.lmeval import LmEvalRunner

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text(
        "task: t_missing\ndataset_path: json\ndataset_kwargs: {data_files: {test: gone.jsonl}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\n"
        "doc_to_target: 0\nmetric_list: [{metric: acc}]\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gone.jsonl").write_text('{"q": "decoy"}\n')  # in the cwd only
    with pytest.raises(EvalError, match=r"^\S+tasks: data file 'gone.jsonl' not found \(looked for .*"
                                        r"tasks/gone.jsonl\)"):
        LmEvalRunner(["t_missing"], include_paths=[tasks])
