"""Evaluator: metrics, objectives, per-item scores, growing subsets, the `evaluate` command."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import math
import string
from pathlib import Path

import pandas as pd
import pytest
import torch

from vlmexp.cli import main
from vlmexp.errors import EvalError
from vlmexp.eval.evaluator import EvalResult, Evaluator
from vlmexp.eval.prompt import image_prompt, split_context
from vlmexp.eval.scorer import encode_prefix, score_continuations_naive

EXAMPLES = Path(__file__).resolve().parents[1] / "evals" / "examples"
OBJECTIVES = {"vl": {"example_shapes_jsonl": 3.0, "example_mmbench_tsv": 1.0},
              "text": {"example_next_item": 1.0}, "captions": {"example_captions": 1.0}}


@pytest.fixture(scope="module")
def evaluator(tiny_processor):
    cfg = {"tasks": ["shapes_jsonl.yaml", "mmbench_tsv.yaml", "captions.yaml", "next_item_lmeval.yaml"],
           "objectives": OBJECTIVES, "batch_size": 3}
    return Evaluator.from_config(cfg, tiny_processor("llava"), base_dir=EXAMPLES)


@pytest.fixture(scope="module")
def result(evaluator, tiny) -> EvalResult:
    return evaluator.evaluate(tiny("llava"))


def test_metrics_and_objectives(result, evaluator):
    assert set(result.metrics) == {"example_shapes_jsonl", "example_mmbench_tsv", "example_captions",
                                   "example_next_item"}
    for task, items in result.items.items():
        metric = evaluator.tasks[task].primary_metric
        assert len(items) == len(evaluator.subset(task))
        assert result.metrics[task][metric] == pytest.approx(sum(i.correct for i in items) / len(items))
    m = result.metrics
    assert result.objectives["vl"] == pytest.approx(
        (3 * m["example_shapes_jsonl"]["acc"] + m["example_mmbench_tsv"]["acc"]) / 4)
    assert result.objectives["captions"] == m["example_captions"]["recall@1"]
    assert result.objectives["text"] == m["example_next_item"]["acc"]
    assert set(result.seconds) == set(result.metrics) | {"total"}
    json.dumps(result.to_json())  # JSON-ready


def test_items_carry_choice_scores_and_margin(result, evaluator, tiny, tiny_processor):
    model, proc = tiny("llava"), tiny_processor("llava")
    task = evaluator.tasks["example_shapes_jsonl"]
    for score in result.items["example_shapes_jsonl"]:
        item = task.items[score.index]
        # an independent encoding: each choice's ids from the processor's encoding of the full text
        pairs = [split_context(image_prompt(proc, item.question), c) for c in item.choices]
        prefix = encode_prefix(proc, item.load_image(), pairs[0][0])
        n = prefix["input_ids"].shape[1]
        conts = [encode_prefix(proc, item.load_image(), a + b)["input_ids"][0, n:].tolist() for a, b in pairs]
        naive = [s.logprob for s in score_continuations_naive(model, prefix, conts)]
        assert score.scores == pytest.approx(naive, abs=1e-4)
        gold = item.choices.index(item.answer)
        assert score.answer == item.answer
        assert score.chosen == item.choices[max(range(4), key=naive.__getitem__)]
        assert score.margin == pytest.approx(naive[gold] - max(naive[:gold] + naive[gold + 1:]), abs=1e-4)
        assert score.correct == (score.chosen == item.answer) == (score.margin > 0)
    for score in result.items["example_next_item"]:
        assert len(score.scores) == 3 and score.correct == (score.chosen == score.answer)


def test_growing_subsets_and_task_filter(evaluator, result, tiny):
    model = tiny("llava")
    head = evaluator.evaluate(model, tasks=["example_shapes_jsonl", "example_next_item"], stop=2)
    tail = evaluator.evaluate(model, tasks=["example_shapes_jsonl", "example_next_item"], start=2)
    assert set(head.metrics) == {"example_shapes_jsonl", "example_next_item"}
    assert set(head.objectives) == {"vl", "text"}  # vl from its one task present
    assert head.objectives["vl"] == head.metrics["example_shapes_jsonl"]["acc"]
    for task in ("example_shapes_jsonl", "example_next_item"):
        subset = evaluator.subset(task)
        assert {i.index for i in head.items[task]} == set(subset[:2])
        assert {i.index for i in tail.items[task]} == set(subset[2:])
        full = {i.index: i.scores for i in result.items[task]}
        for part in (head, tail):
            for i in part.items[task]:
                assert i.scores == pytest.approx(full[i.index], abs=1e-5)
        assert len(head.items[task]) + len(tail.items[task]) == len(subset)
    with pytest.raises(EvalError, match="empty subset"):
        evaluator.evaluate(model, start=100)
    with pytest.raises(EvalError, match="unknown task 'nope'"):
        evaluator.evaluate(model, tasks=["nope"])


def test_fractions_take_each_tasks_own_share(evaluator, tiny):
    model = tiny("llava")
    names = ["example_captions", "example_mmbench_tsv"]
    sizes = {t: len(evaluator.subset(t)) for t in names}
    assert len(set(sizes.values())) == 2  # tasks of different lengths
    seen = {t: [] for t in names}
    for a, b in ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0)):
        part = evaluator.evaluate(model, tasks=names, fractions=(a, b))
        for t in names:
            want = evaluator.subset(t)[math.ceil(a * sizes[t]):math.ceil(b * sizes[t])]
            assert [i.index for i in part.items[t]] == want
            seen[t] += want
    assert all(seen[t] == evaluator.subset(t) for t in names)
    with pytest.raises(EvalError, match="fractions must satisfy"):
        evaluator.evaluate(model, fractions=(0.5, 0.25))


def test_in_place_change_moves_every_metric(evaluator, result, tiny):
    model = copy.deepcopy(tiny("llava"))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(-1.0)
    flipped = evaluator.evaluate(model)
    for task in result.items:
        a = torch.tensor([s.scores for s in result.items[task]])
        b = torch.tensor([s.scores for s in flipped.items[task]])
        assert (a - b).abs().min() > 1e-3, task


def test_config_errors(tiny_processor):
    with pytest.raises(EvalError, match="names unknown task 'nope'"):
        Evaluator.from_config({"tasks": ["shapes_jsonl.yaml"], "objectives": {"x": {"nope": 1}}},
                              tiny_processor("llava"), base_dir=EXAMPLES)
    with pytest.raises(EvalError, match="no 'tasks'"):
        Evaluator.from_config({}, tiny_processor("llava"))


def test_cli_evaluate(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["evaluate", "tiny:qwen2_vl", "--tasks", str(EXAMPLES / "shapes_jsonl.yaml"),
                 str(EXAMPLES / "captions.yaml"), "--out", str(out), "--stop", "3"])
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"example_shapes_jsonl", "example_captions"}
    assert len(data["items"]["example_shapes_jsonl"]) == 3
    printed = capsys.readouterr().out
    assert "example_shapes_jsonl" in printed and "objective" in printed
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"tasks: [{EXAMPLES / 'shapes_jsonl.yaml'}]\nobjectives: {{vl: {{example_shapes_jsonl: 1}}}}\n")
    assert main(["evaluate", "tiny:gemma3", "--eval-config", str(cfg), "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["objectives"]) == {"vl"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: bad\nkind: image_choice\nsource: {type: jsonl, path: none.jsonl}\n")
    out.unlink()
    capsys.readouterr()
    assert main(["evaluate", "tiny:llava", "--tasks", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.yaml: data file 'none.jsonl' not found" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_cli_evaluates_saved_checkpoint(name, tmp_path, tiny, tiny_processor, capsys):
    """A saved checkpoint (model + processor files) scores exactly as the in-memory model."""
    from vlmexp.checkpoint import save_model

    folder = save_model(tiny(name), tmp_path / name, processor=tiny_processor(name))
    task = str(EXAMPLES / "shapes_jsonl.yaml")
    assert main(["evaluate", str(folder), "--tasks", task, "--out", str(tmp_path / "a.json")]) == 0
    assert main(["evaluate", f"tiny:{name}", "--tasks", task, "--out", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())["items"]["example_shapes_jsonl"]
    b = json.loads((tmp_path / "b.json").read_text())["items"]["example_shapes_jsonl"]
    assert torch.allclose(torch.tensor([x["scores"] for x in a]), torch.tensor([x["scores"] for x in b]),
                          atol=1e-5)


def test_cli_evaluates_a_recipe_merged_in_memory(tmp_path, tiny, tiny_processor):
    """A recipe is merged in memory, then scored: equal to scoring the written merge."""
    import copy

    import yaml

    from vlmexp.checkpoint import save_model

    base = save_model(tiny("llava"), tmp_path / "base", processor=tiny_processor("llava"))
    donor = copy.deepcopy(tiny("llava"))
    with torch.no_grad():
        for p in donor.parameters():
            p.mul_(1.5)
    save_model(donor, tmp_path / "donor", processor=tiny_processor("llava"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "task_arithmetic", "base": {"path": str(base)},
        "donors": [{"name": "d", "path": str(tmp_path / "donor")}],
        "components": {"language": {"d": {"weight": 0.5}}, "projector": {"d": {"weight": 1.0}}}}))
    task = str(EXAMPLES / "shapes_jsonl.yaml")
    assert main(["evaluate", str(recipe), "--tasks", task, "--out", str(tmp_path / "r.json")]) == 0
    assert main(["merge", str(recipe), "--out", str(tmp_path / "merged")]) == 0
    assert main(["evaluate", str(tmp_path / "merged"), "--tasks", task,
                 "--out", str(tmp_path / "m.json")]) == 0
    assert main(["evaluate", str(base), "--tasks", task, "--out", str(tmp_path / "b.json")]) == 0
    scores = {k: [x["scores"] for x in json.loads((tmp_path / f"{k}.json").read_text())
                  ["items"]["example_shapes_jsonl"]] for k in "rmb"}
    assert torch.allclose(torch.tensor(scores["r"]), torch.tensor(scores["m"]), atol=1e-5)
    assert not torch.allclose(torch.tensor(scores["r"]), torch.tensor(scores["b"]), atol=1e-3)


def test_cli_takes_the_eval_group_of_the_search_config(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["evaluate", "tiny:llava", "eval=demo", "--test", "--stop", "2",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"demo_color_shape_test", "demo_next_item_test"}
    assert set(data["objectives"]) == {"vl", "text", "combined"}
    assert all(len(items) == 2 for items in data["items"].values())
    capsys.readouterr()
    assert main(["evaluate", "tiny:llava", "eval=nope"]) == 2
    assert "eval=nope: no such config in conf/eval/" in capsys.readouterr().err


# --- MMBench protocol and CircularEval: scores computed by hand -------------------------------

def _vlmevalkit_prompt(row: dict) -> str:
    """VLMEvalKit's ImageMCQDataset.build_prompt (vlmeval/dataset/image_mcq.py), on a raw row."""
    options = {c: row[c] for c in string.ascii_uppercase if c in row and not pd.isna(row[c])}
    prompt = f"Hint: {row['hint']}\n" if not pd.isna(row.get("hint", math.nan)) else ""
    prompt += f"Question: {row['question']}\nOptions:\n"
    prompt += "".join(f"{key}. {item}\n" for key, item in options.items())
    return prompt + "Please select the correct answer from the options above. \n"


def _letter_scores(model, proc, image, text: str, n: int) -> list[float]:
    """One plain forward over the exact prompt tokens; the letters' log-probabilities at its end
    (the tiny tokenizer writes " A" after "Answer:" as the one token "▁A")."""
    enc = proc(images=[image], text=[f"<image>\n{text}\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
    ids = proc.tokenizer.convert_tokens_to_ids([f"▁{c}" for c in string.ascii_uppercase[:n]])
    return torch.log_softmax(logits.float(), -1)[ids].tolist()


def _by_hand(model, proc, prompts: dict[int, list[tuple[object, str, int, int]]],
             categories: dict[int, str]) -> dict[str, float]:
    """acc, acc/<category> and the CircularEval acc from group -> [(image, text, options, gold)]
    (the original order first); also the per-prompt scores and hits, for the item checks."""
    hits = {g: [] for g in prompts}
    scores = {g: [] for g in prompts}
    for g, asked in prompts.items():
        for image, text, n, gold in asked:
            s = _letter_scores(model, proc, image, text, n)
            ranked = sorted(s, reverse=True)
            assert ranked[0] - ranked[1] > 1e-4  # no near-tie: the argmax is the same either way
            scores[g].append(s)
            hits[g].append(max(range(n), key=s.__getitem__) == gold)
    vanilla = {g: h[0] for g, h in hits.items()}
    circular = {g: all(h) for g, h in hits.items()}

    def report(hit: dict[int, bool], name: str) -> dict[str, float]:
        out = {name: sum(hit.values()) / len(hit)}
        for c in sorted(set(categories.values())):
            group = [hit[g] for g in hit if categories[g] == c]
            out[f"{name}/{c}"] = sum(group) / len(group)
        return out

    return {"plain": report(vanilla, "acc"), "circular": report(circular, "acc"),
            "scores": scores, "vanilla_hits": vanilla, "circular_hits": circular}


@pytest.fixture(scope="module")
def mmbench_by_hand(tiny, tiny_processor):
    """The MMBench example read with pandas as VLMEvalKit reads it, images named by index
    resolved, each row (original and circular copies) prompted and scored by hand."""
    from PIL import Image

    frame = pd.read_csv(EXAMPLES / "mmbench_dev.tsv", sep="\t")
    images = {str(i): str(b) for i, b in zip(frame["index"], frame["image"], strict=True)}
    for key in images:  # VLMEvalKit's ImageBaseDataset: in row order, a short value is an index
        if len(images[key]) <= 64:
            images[key] = images[images[key]]
    prompts: dict[int, list] = {}
    categories: dict[int, str] = {}
    for row in frame.to_dict("records"):
        image = Image.open(io.BytesIO(base64.b64decode(images[str(row["index"])]))).convert("RGB")
        n = sum(not pd.isna(row[c]) for c in "ABCD")
        g = row["index"] % 1_000_000
        prompts.setdefault(g, []).append((image, _vlmevalkit_prompt(row), n, "ABCD".index(row["answer"])))
        categories[g] = row["category"]
    return _by_hand(tiny("llava"), tiny_processor("llava"), prompts, categories)


@pytest.fixture(scope="module")
def scienceqa_by_hand(tiny, tiny_processor):
    """The ScienceQA-style example: every circular shift of each row's options, by hand."""
    from PIL import Image

    prompts: dict[int, list] = {}
    categories: dict[int, str] = {}
    for g, line in enumerate((EXAMPLES / "scienceqa.jsonl").read_text().splitlines()):
        row = json.loads(line)
        image = Image.open(EXAMPLES / row["image"]).convert("RGB")
        choices, right = row["choices"], row["choices"][row["answer"]]
        for k in range(len(choices)):
            order = choices[k:] + choices[:k]
            fields = {"question": row["question"], "hint": row["hint"] or math.nan,
                      **dict(zip(string.ascii_uppercase, order, strict=False))}
            prompts.setdefault(g, []).append((image, _vlmevalkit_prompt(fields), len(order),
                                              order.index(right)))
        categories[g] = row["subject"]
    return _by_hand(tiny("llava"), tiny_processor("llava"), prompts, categories)


@pytest.fixture(scope="module")
def protocol_result(tiny, tiny_processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sqa")
    spec = (EXAMPLES / "scienceqa.yaml").read_text().replace(
        "scienceqa.jsonl", str(EXAMPLES / "scienceqa.jsonl")).replace("example_scienceqa", "sqa_circular")
    (folder / "sqa_circular.yaml").write_text(spec + "circular: true\n")
    tasks = [EXAMPLES / "mmbench_dev.yaml", EXAMPLES / "mmbench_dev_circular.yaml",
             EXAMPLES / "scienceqa.yaml", folder / "sqa_circular.yaml"]
    evaluator = Evaluator.from_config({"tasks": [str(t) for t in tasks], "batch_size": 2},
                                      tiny_processor("llava"))
    return evaluator, evaluator.evaluate(tiny("llava"))


def test_mmbench_scores_equal_the_hand_computed(protocol_result, mmbench_by_hand, scienceqa_by_hand):
    """acc, per-category acc and the CircularEval acc equal those of a forward run by hand on
    VLMEvalKit's exact prompts, argmax over the letters (MMBench: the TSV's own circular copies;
    ScienceQA-style: every circular shift)."""
    _, result = protocol_result
    cases = [("example_mmbench_dev", mmbench_by_hand, "plain"),
             ("example_mmbench_dev_circular", mmbench_by_hand, "circular"),
             ("example_scienceqa", scienceqa_by_hand, "plain"),
             ("sqa_circular", scienceqa_by_hand, "circular")]
    for task, hand, protocol in cases:
        metrics = result.metrics[task]
        assert {k: v for k, v in metrics.items() if k.startswith("acc") and k != "acc_vanilla"} \
            == hand[protocol], task
        for item in result.items[task]:
            asked = hand["scores"][item.index]
            got = [item.scores, *item.rotations]  # every prompt's letters, in the order asked
            assert len(got) == (len(asked) if protocol == "circular" else 1)
            assert torch.tensor(got).sub(torch.tensor(asked[:len(got)])).abs().max() < 1e-6
            assert item.correct == hand[f"{'vanilla' if protocol == 'plain' else 'circular'}_hits"][item.index]
        if protocol == "circular":
            assert metrics["acc_vanilla"] == hand["plain"]["acc"]
    # the values these examples give the tiny model (hand-checked once; see the report)
    assert mmbench_by_hand["plain"] == {"acc": 3 / 8, "acc/attribute_recognition": 1 / 4,
                                        "acc/shape_recognition": 2 / 4}
    assert scienceqa_by_hand["plain"] == {"acc": 3 / 6, "acc/language science": 0.0,
                                          "acc/natural science": 1.0, "acc/social science": 0.5}


def test_circular_is_at_most_plain_and_stricter_on_an_item(protocol_result):
    _, result = protocol_result
    for plain, circular in (("example_mmbench_dev", "example_mmbench_dev_circular"),
                            ("example_scienceqa", "sqa_circular")):
        assert result.metrics[circular]["acc"] <= result.metrics[plain]["acc"]
        flipped = [a.index for a, b in zip(result.items[plain], result.items[circular], strict=True)
                   if a.correct and not b.correct]
        assert flipped, (plain, circular)
        for a, b in zip(result.items[plain], result.items[circular], strict=True):
            assert b.correct <= a.correct and b.margin <= a.margin + 1e-6
            assert a.scores == pytest.approx(b.scores, abs=1e-6)  # the same original prompt


def test_circular_item_needs_every_rotation():
    """The rule itself, on scores where some items pass every rotation."""
    from vlmexp.eval.evaluator import _item_score
    from vlmexp.eval.tasks import Item, Task

    task = Task("t", 1, "image_choice", Path("t.yaml"), protocol="mmbench", circular=True)
    item = Item(0, None, "q?", ("x", "y", "z"), "y", "row 0")
    variants = task.variants(item)  # golds 1, 0, 2
    right = _item_score("t", item, variants, [[0, 2, 1], [3, 1, 0], [0, 1, 5]])
    assert (right.correct, right.margin, right.chosen) == (True, 1, "y")
    assert right.rotations == [[3, 1, 0], [0, 1, 5]]
    wrong = _item_score("t", item, variants, [[0, 2, 1], [3, 1, 0], [0, 6, 5]])
    assert (wrong.correct, wrong.margin, wrong.chosen) == (False, -1, "y")


def test_identity_names_the_protocol_and_digests_every_rotation(protocol_result, kind_processor):
    from vlmexp.zoo.tokenizers import build_tokenizer

    evaluator, result = protocol_result
    identity = evaluator.identity()
    assert identity["example_mmbench_dev"].startswith("v1 image_choice mmbench plain prompts:")
    assert identity["example_mmbench_dev_circular"].startswith(
        "v1 image_choice mmbench-circular plain prompts:")
    assert result.tasks == identity
    shapes = Evaluator.from_config({"tasks": [str(EXAMPLES / "shapes_jsonl.yaml")]},
                                   evaluator.processor)
    assert shapes.identity()["example_shapes_jsonl"].startswith("v1 image_choice cloze plain prompts:")
    # through a chat template the MMBench text is the user message's text, every rotation's
    proc = kind_processor("qwen2", build_tokenizer("qwen2", chat_template=True))
    chat = Evaluator.from_config({"tasks": [str(EXAMPLES / "mmbench_dev_circular.yaml")]}, proc)
    task = chat.tasks["example_mmbench_dev_circular"]
    frame = pd.read_csv(EXAMPLES / "mmbench_dev.tsv", sep="\t")
    rows = {r["index"]: r for r in frame.to_dict("records")}
    prompts = []
    for i in chat.subset("example_mmbench_dev_circular"):
        for k in range(len(task.items[i].choices)):
            text = _vlmevalkit_prompt(rows[i + k * 1_000_000])
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            prompts.append(proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    digest = hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:12]
    assert chat.identity()["example_mmbench_dev_circular"] == (
        f"v1 image_choice mmbench-circular chat prompts:{digest}")


def test_rotations_share_the_image_encoding(protocol_result, tiny):
    evaluator, _ = protocol_result
    task = evaluator.tasks["example_mmbench_dev_circular"]
    item = task.items[0]
    encoded = evaluator._encode(task, item, task.variants(item), "llava")
    assert len(encoded) == 4 and all(len(c) == 4 for _, c in encoded)
    assert all(prefix["pixel_values"] is encoded[0][0]["pixel_values"] for prefix, _ in encoded)
    assert len({tuple(prefix["input_ids"][0].tolist()) for prefix, _ in encoded}) == 4


def test_a_non_finite_choice_score_fails_naming_the_task_and_item(evaluator, tiny):
    """A NaN score must not become a number: max() would pick the first choice every time."""
    model = copy.deepcopy(tiny("llava"))
    with torch.no_grad():
        model.lm_head.weight[5:9] = float("nan")  # some answers' tokens only: others stay finite
    with pytest.raises(EvalError, match=r"^task example_shapes_jsonl: item \d+ \(.*shapes\.jsonl, "
                                        r"row \d+\): the score of '.+' is not finite"):
        evaluator.evaluate(model, tasks=["example_shapes_jsonl"])


def test_image_items_run_several_per_forward(tiny, tiny_processor):
    """Image tasks run `batch_size` prompts per forward (every rotation of a CircularEval item is
    a prompt); the scores are those of one prompt per forward."""
    model, proc = tiny("llava"), tiny_processor("llava")
    cfg = {"tasks": [str(EXAMPLES / "shapes_jsonl.yaml"), str(EXAMPLES / "mmbench_dev_circular.yaml")]}
    batched, single = (Evaluator.from_config({**cfg, "batch_size": b}, proc) for b in (4, 1))
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, __, kw: rows.append(kw["input_ids"].shape[0]) if "pixel_values" in kw else None,
        with_kwargs=True)
    try:
        result = batched.evaluate(model)
    finally:
        hook.remove()
    prompts = {t: sum(len(task.variants(task.items[i])) for i in batched.subset(t))
               for t, task in batched.tasks.items()}
    assert prompts["example_mmbench_dev_circular"] > 2 * len(batched.subset("example_mmbench_dev_circular"))
    # as few forwards as 4 prompts each allow (lengths differ, so some rows are padded)
    assert sum(rows) == sum(prompts.values()) and max(rows) == 4
    assert len(rows) == sum(math.ceil(n / 4) for n in prompts.values())
    alone = single.evaluate(model)
    for task, items in result.items.items():
        for got, want in zip(items, alone.items[task], strict=True):
            assert got.index == want.index and got.correct == want.correct
            assert got.scores == pytest.approx(want.scores, abs=1e-5)
            for a, b in zip(got.rotations, want.rotations, strict=True):
                assert a == pytest.approx(b, abs=1e-5)


def test_image_tasks_refuse_a_processor_that_cannot_see_images(tiny_processor):
    cfg = {"tasks": ["shapes_jsonl.yaml"]}
    with pytest.raises(EvalError, match=r"^example_shapes_jsonl: image tasks need the model's "
                                        r"processor, but \w+ has no image processor"):
        Evaluator.from_config(cfg, tiny_processor("llava").tokenizer, base_dir=EXAMPLES)
    with pytest.raises(EvalError, match="batch_size must be at least 1, got 0"):
        Evaluator.from_config({**cfg, "batch_size": 0}, tiny_processor("llava"), base_dir=EXAMPLES)


@pytest.mark.parametrize("body, message", [
    ("tasks: [shapes_jsonl.yaml]\nobjective: {x: {t: 1}}\n", "unknown key 'objective'"),
    ("tasks: [shapes_jsonl.yaml]\nobjectives: {x: {t: a}}\n", "objectives.x must map task names"),
    ("tasks: [shapes_jsonl.yaml]\nobjectives: {x: [t]}\n", "objectives.x must map task names"),
    ("tasks: [shapes_jsonl.yaml]\nbatch_size: abc\n", "batch_size: 'abc' is not a whole number"),
])
def test_a_bad_eval_config_is_one_line(tmp_path, capsys, body, message):
    cfg = tmp_path / "e.yaml"
    cfg.write_text(body)
    assert main(["evaluate", "tiny:llava", "--eval-config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_circular_eval_counts_an_item_only_when_every_rotation_is_right(tiny, tiny_processor,
                                                                       monkeypatch):
    """A scorer that knows the answers of the shape questions (in every rotation) and answers
    "A" to everything else: CircularEval keeps exactly the shape items, per category too, while
    the original order alone also credits the other items whose answer is A."""
    from vlmexp.eval import evaluator as ev
    from vlmexp.eval.scorer import ContinuationScore

    evaluator = Evaluator.from_config({"tasks": [str(EXAMPLES / "mmbench_dev_circular.yaml")],
                                       "batch_size": 2}, tiny_processor("llava"))
    task = evaluator.tasks["example_mmbench_dev_circular"]
    order = [(task.items[pos], v) for pos in evaluator.subset(task.name)
             for v in task.variants(task.items[pos])]
    assert len(order) > len(evaluator.subset(task.name))  # rotations were asked

    def oracle(model, pairs, *, batch_size):
        out = []
        for _ in pairs:
            item, variant = order.pop(0)
            pick = variant.gold if item.category == "shape_recognition" else 0
            out.append([ContinuationScore(0.0 if i == pick else -1.0, 1)
                        for i in range(len(variant.answers))])
        return out

    monkeypatch.setattr(ev, "score_items", oracle)
    result = evaluator.evaluate(tiny("llava"))
    assert not order  # every prompt was scored once
    items = [task.items[p] for p in evaluator.subset(task.name)]
    shapes = sum(i.category == "shape_recognition" for i in items)
    first_a = sum(i.category != "shape_recognition" and task.variants(i)[0].gold == 0
                  for i in items)
    metrics = result.metrics[task.name]
    assert 0 < shapes < len(items) and first_a > 0
    assert metrics["acc"] == shapes / len(items)
    assert metrics["acc/shape_recognition"] == 1.0 and metrics["acc/attribute_recognition"] == 0
    assert metrics["acc_vanilla"] == (shapes + first_a) / len(items)
