"""Task YAML loading: every source kind of `evals/examples/`, subsets, and one-line errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from vlmexp.errors import EvalError
from vlmexp.eval.prompt import mmbench_text
from vlmexp.eval.tasks import load_task, load_tasks, rotations

EXAMPLES = Path(__file__).resolve().parents[1] / "evals" / "examples"


def test_jsonl_example():
    task = load_task(EXAMPLES / "shapes_jsonl.yaml")
    assert (task.name, task.kind, task.primary_metric) == ("example_shapes_jsonl", "image_choice", "acc")
    assert len(task.items) == 8
    first = task.items[0]
    assert first.choices == ("red", "green", "blue", "yellow") and first.answer == "red"
    assert first.question == "What colour is the shape?"
    img = first.load_image()
    assert img.size == (32, 32)
    assert img.getpixel((16, 16)) == (220, 30, 30)  # the red of make_examples.py
    # seeded shuffle, then the first 6: deterministic, a permutation prefix, not the first 6 rows
    subset = task.subset_indices()
    assert subset == load_task(EXAMPLES / "shapes_jsonl.yaml").subset_indices()
    assert len(subset) == 6 and len(set(subset)) == 6 and subset != list(range(6))


def test_datasets_example_maps_columns_and_index_answers():
    task = load_task(EXAMPLES / "shapes_datasets.yaml")
    rows = [json.loads(line) for line in (EXAMPLES / "shapes_ds.json").read_text().splitlines()]
    assert len(task.items) == len(rows) == 8
    for item, row in zip(task.items, rows, strict=True):
        assert item.choices == tuple(row["opts"])
        assert item.answer == row["opts"][row["ans"]]
        assert item.question == row["q"]
    assert task.items[0].load_image().size == (32, 32)
    assert task.subset_indices() == list(range(8))  # no subset: all rows, in order


def test_tsv_example_base64_and_letters():
    task = load_task(EXAMPLES / "mmbench_tsv.yaml")
    assert len(task.items) == 6
    jsonl = load_task(EXAMPLES / "shapes_jsonl.yaml")
    for item, ref in zip(task.items, jsonl.items, strict=False):
        assert item.choices == ("red", "green", "blue", "yellow")
        assert item.answer == ref.answer  # the letter resolved to the same colour
        assert isinstance(item.image, bytes)
    assert task.items[0].load_image().getpixel((16, 16)) == (220, 30, 30)


def test_caption_retrieval_distractors():
    task = load_task(EXAMPLES / "captions.yaml")
    assert task.primary_metric == "recall@1"
    captions = {json.loads(x)["caption"] for x in (EXAMPLES / "captions.jsonl").read_text().splitlines()}
    for item in task.items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.answer in item.choices and set(item.choices) <= captions
        assert item.question == "Describe the image."
    again = load_task(EXAMPLES / "captions.yaml")
    assert [i.choices for i in again.items] == [i.choices for i in task.items]


def test_lm_eval_example_and_load_tasks_folder():
    task = load_task(EXAMPLES / "next_item_lmeval.yaml")
    assert task.kind == "lm_eval" and task.lm_eval_task == "example_next_item"
    assert task.include_path == (EXAMPLES / "lm_eval").resolve()
    assert task.subset_indices(8) == task.subset_indices(8) and len(task.subset_indices(8)) == 6
    names = [t.name for t in load_tasks([EXAMPLES])]
    assert sorted(names) == ["example_captions", "example_mmbench_dev", "example_mmbench_dev_circular",
                             "example_mmbench_tsv", "example_next_item", "example_scienceqa",
                             "example_shapes_datasets", "example_shapes_jsonl"]


# --- errors: one line naming file (and row) ----------------------------------------------------

def _write(folder: Path, rows: list[dict], yaml_extra: str = "", name: str = "t") -> Path:
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\nversion: 1\nkind: image_choice\n"
                    f"source: {{type: jsonl, path: data.jsonl}}\n{yaml_extra}")
    return path


def _row(**kw) -> dict:
    row = {"image": str(EXAMPLES / "images" / "0000.png"), "question": "q?",
           "choices": ["red", "blue"], "answer": "red"}
    return {**row, **kw}


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_error_missing_image(tmp_path):
    path = _write(tmp_path, [_row(), _row(image="images/nope.png")])
    with pytest.raises(EvalError) as err:
        load_task(path)
    msg = _one_line(err)
    assert "data.jsonl, row 1" in msg and "nope.png" in msg and "not found" in msg


def test_error_mapped_column_missing(tmp_path):
    path = _write(tmp_path, [_row()], "  # \n")
    path.write_text(path.read_text().replace("path: data.jsonl}", "path: data.jsonl, columns: {question: q}}"))
    with pytest.raises(EvalError) as err:
        load_task(path)
    msg = _one_line(err)
    assert "row 0" in msg and "'q'" in msg and "not in the data" in msg


def test_error_answer_not_among_choices(tmp_path):
    path = _write(tmp_path, [_row(), _row(), _row(answer="purple")])
    with pytest.raises(EvalError) as err:
        load_task(path)
    msg = _one_line(err)
    assert "row 2" in msg and "'purple'" in msg and "not among the choices" in msg


def test_error_empty_subset(tmp_path):
    with pytest.raises(EvalError, match="empty subset"):
        load_task(_write(tmp_path, [_row()], "subset: {size: 0, seed: 0}\n"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="empty subset") as err:
        load_task(_write(tmp_path / "empty", []))
    assert "t.yaml" in _one_line(err)


def test_error_broken_base64(tmp_path):
    good = base64.b64encode((EXAMPLES / "images" / "0000.png").read_bytes()).decode()
    (tmp_path / "m.tsv").write_text(
        "index\timage\tquestion\tA\tB\tanswer\n"
        f"0\t{good}\tq?\tred\tblue\tA\n"
        "1\tnot*base64!!\tq?\tred\tblue\tB\n")
    path = tmp_path / "m.yaml"
    path.write_text("task: m\nkind: image_choice\nsource: {type: tsv, path: m.tsv}\n")
    with pytest.raises(EvalError) as err:
        load_task(path)
    msg = _one_line(err)
    assert "m.tsv, row 1" in msg and "broken base64 image" in msg
    # valid base64 of bytes that are no image is broken too
    bad = base64.b64encode(b"hello, not a png").decode()
    (tmp_path / "m.tsv").write_text("index\timage\tquestion\tA\tB\tanswer\n"
                                    f"0\t{bad}\tq?\tred\tblue\tA\n")
    with pytest.raises(EvalError, match="row 0: broken base64 image"):
        load_task(path)


def test_error_bad_kind_and_duplicate_names(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("task: k\nkind: vqa\n")
    with pytest.raises(EvalError, match="k.yaml: kind 'vqa' is not one of"):
        load_task(path)
    a = _write(tmp_path, [_row()], name="dup")
    with pytest.raises(EvalError, match="already defined"):
        load_tasks([a, a])


def test_caption_list_rows_and_parquet_source(tmp_path):
    import datasets

    img = str(EXAMPLES / "images" / "0001.png")
    (tmp_path / "c.jsonl").write_text(json.dumps(
        {"image": img, "captions": ["a cat", "a yellow circle", "a dog"], "answer": "a yellow circle"}) + "\n")
    (tmp_path / "c.yaml").write_text("task: c\nkind: caption_retrieval\nsource: {type: jsonl, path: c.jsonl}\n")
    item = load_task(tmp_path / "c.yaml").items[0]
    assert item.choices == ("a cat", "a yellow circle", "a dog") and item.answer == "a yellow circle"
    datasets.Dataset.from_list([{"image": img, "question": "q?", "choices": ["a", "b"], "answer": 1}]
                               ).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.yaml").write_text("task: d\nkind: image_choice\nsource: {type: datasets, path: parquet, "
                                     "data_files: d.parquet, split: train}\n")
    item = load_task(tmp_path / "d.yaml").items[0]
    assert (item.choices, item.answer, item.question) == (("a", "b"), "b", "q?")


# --- VLMEvalKit TSVs and the MMBench protocol ----------------------------------------------------

def _tsv_rows(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_mmbench_tsv_loads_as_vlmevalkit():
    """Images named by index are the named row's (one decoded copy), empty cells are missing,
    the circular copies (index >= 10^6) become their item's other option orders."""
    task = load_task(EXAMPLES / "mmbench_dev.yaml")
    rows = _tsv_rows(EXAMPLES / "mmbench_dev.tsv")
    mains = [r for r in rows if int(r["index"]) < 1_000_000]
    assert len(rows) == 28 and len(task.items) == len(mains) == 8
    assert [i.index for i in task.items] == list(range(8))
    for item, row in zip(task.items, mains, strict=True):
        options = [row[c] for c in "ABCD" if row[c]]
        assert item.choices == tuple(options) and len(options) in (3, 4)
        assert item.answer == options["ABCD".index(row["answer"])]
        assert item.question == row["question"]
        assert item.hint == (row["hint"] or None) and item.category == row["category"]
        assert item.split == "dev"
        copies = [r for r in rows if int(r["index"]) % 1_000_000 == int(row["index"])][1:]
        assert item.copies == tuple(tuple(r[c] for c in "ABCD" if r[c]) for r in copies)
        assert len(item.copies) == len(options) - 1
        if row["image"].isdigit():  # the named row's image: the same bytes object, decoded once
            assert item.image is task.items[int(row["image"])].image
        else:
            assert item.image == base64.b64decode(row["image"])
    assert {i.hint is None for i in task.items} == {True, False}
    assert task.items[1].load_image().getpixel((16, 16)) == (220, 30, 30)  # row 0's red circle
    assert (task.protocol, task.circular, task.protocol_name) == ("mmbench", False, "mmbench")


def test_mmbench_variants_show_vlmevalkits_text_and_score_letters():
    plain = load_task(EXAMPLES / "mmbench_dev.yaml")
    circular = load_task(EXAMPLES / "mmbench_dev_circular.yaml")
    assert circular.protocol_name == "mmbench-circular"
    item = plain.items[1]
    (variant,) = plain.variants(item)
    assert variant.text == (
        "Hint: The picture shows one shape on a white background.\nQuestion: Which shape is shown?\n"
        "Options:\nA. square\nB. circle\nC. triangle\n"
        "Please select the correct answer from the options above. \n")
    assert (variant.answers, variant.gold) == (("A", "B", "C"), 1)
    assert plain.variants(plain.items[0])[0].text.startswith("Question: What colour")  # no hint
    rows = {int(r["index"]): r for r in _tsv_rows(EXAMPLES / "mmbench_dev.tsv")}
    for item in circular.items:
        variants = circular.variants(item)
        assert len(variants) == len(item.choices)
        for k, v in enumerate(variants):  # the data's own copy k, lettered as the TSV letters it
            row = rows[item.index + k * 1_000_000]
            order = tuple(row[c] for c in "ABCD" if row[c])
            assert v.options == order and v.answers == tuple("ABCD"[:len(order)])
            assert v.answers[v.gold] == row["answer"]
            assert v.text == mmbench_text(item.question, order, item.hint)


def test_generated_rotations_and_cloze_hints(tmp_path):
    assert rotations(("a", "b", "c", "d"))[1:] == [("b", "c", "d", "a"), ("c", "d", "a", "b"),
                                                   ("d", "a", "b", "c")]
    sqa = load_task(EXAMPLES / "scienceqa.yaml")
    assert [len(i.choices) for i in sqa.items] == [2, 3, 4, 5, 2, 3]
    assert [i.category for i in sqa.items][:3] == ["natural science"] * 2 + ["language science"]
    assert sqa.items[2].hint is None and sqa.items[0].hint == "A student drew a shape with one crayon."
    assert sqa.variants(sqa.items[0])[0].text.startswith("Hint: A student drew")
    spec = (EXAMPLES / "scienceqa.yaml").read_text().replace("scienceqa.jsonl",
                                                             str(EXAMPLES / "scienceqa.jsonl"))
    (tmp_path / "c.yaml").write_text(spec + "circular: true\n")
    (tmp_path / "z.yaml").write_text(spec.replace("protocol: mmbench", "protocol: cloze"))
    circular, cloze = load_task(tmp_path / "c.yaml"), load_task(tmp_path / "z.yaml")
    item = circular.items[3]  # no copies in a JSONL: every circular shift of its 5 options
    variants = circular.variants(item)
    assert [v.options for v in variants] == rotations(item.choices)
    assert [v.options[v.gold] for v in variants] == [item.answer] * 5
    assert [v.gold for v in variants] == [3, 2, 1, 0, 4]
    (variant,) = cloze.variants(cloze.items[0])  # cloze: the hint is a line before the question
    assert variant.text == "A student drew a shape with one crayon.\nWhich colour is the shape?"
    assert variant.answers == ("blue", "red") and variant.gold == 1
    assert cloze.variants(cloze.items[2])[0].text == "What colour is the shape?"


def _tsv_task(folder: Path, lines: list[str], extra: str = "") -> Path:
    (folder / "m.tsv").write_text("\n".join(lines) + "\n")
    path = folder / "m.yaml"
    path.write_text(f"task: m\nkind: image_choice\nsource: {{type: tsv, path: m.tsv}}\n{extra}")
    return path


def test_tsv_missing_cells_and_letters_as_vlmevalkit(tmp_path):
    good = base64.b64encode((EXAMPLES / "images" / "0000.png").read_bytes()).decode()
    path = _tsv_task(tmp_path, [
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\timage",
        f"7\tq?\tnan\tB\tA\tNaN\t\tA\t{good}",  # pandas: "nan"/"NaN"/empty are missing
        "8\tq?\t \tx\ty\tz\tN/A\tC\t7",
    ])
    first, second = load_task(path).items
    assert first.choices == ("B", "A") and first.answer == "B"  # letter A, though an option is "A"
    assert first.hint is None and second.hint is None
    assert second.choices == ("x", "y", "z") and second.answer == "z"
    assert second.image is first.image
    _tsv_task(tmp_path, ["index\tquestion\tA\tB\tC\tanswer\timage",
                         f"0\tq?\tx\t\tz\tA\t{good}"])
    with pytest.raises(EvalError, match="row 0: options A, C leave a gap"):
        load_task(path)
    _tsv_task(tmp_path, ["index\tquestion\tA\tB\tanswer\timage",
                         f"0\tq?\tx\ty\tA\t{good}", "1\tq?\tx\ty\tA\t5"])
    with pytest.raises(EvalError, match="row 1: image '5' names no other row's index"):
        load_task(path)
    _tsv_task(tmp_path, ["index\tquestion\tA\tB\tanswer\timage",
                         f"0\tq?\tx\ty\tA\t{good}", "1000000\tq?\ty\tw\tB\t0"])
    with pytest.raises(EvalError, match="row 1: a circular copy of index 0 must have its options"):
        load_task(path)
    _tsv_task(tmp_path, ["index\tquestion\tA\tB\tanswer\timage",
                         f"0\tq?\tx\ty\tA\t{good}", "1000000\tq?\ty\tx\tA\t0"])
    with pytest.raises(EvalError, match="answer 'x', has \\['y', 'x'\\] and 'y'"):
        load_task(path)
    # the data's copies are the orders asked, whatever they are; without copies, every shift
    _tsv_task(tmp_path, ["index\tquestion\tA\tB\tC\tanswer\timage",
                         f"0\tq?\tx\ty\tz\tA\t{good}", "2000000\tq?\ty\tx\tz\tB\t0",
                         f"1\tq?\tx\ty\tz\tC\t{good}"], "protocol: mmbench\ncircular: true\n")
    task = load_task(path)
    copied, shifted = task.items
    assert [(v.options, v.gold) for v in task.variants(copied)] == [(("x", "y", "z"), 0),
                                                                   (("y", "x", "z"), 1)]
    assert [v.options for v in task.variants(shifted)] == rotations(("x", "y", "z"))
    # an index >= 10^6 without its original row is an item of its own
    _tsv_task(tmp_path, ["index\tquestion\tA\tB\tanswer\timage",
                         f"1000003\tq?\tx\ty\tB\t{good}"])
    (item,) = load_task(path).items
    assert item.copies == () and item.answer == "y"


def test_protocol_keys_are_checked(tmp_path):
    base = "task: m\nkind: image_choice\nsource: {type: jsonl, path: d.jsonl}\n"
    (tmp_path / "d.jsonl").write_text(json.dumps(_row()) + "\n")
    cases = {"protocol: vqa\n": "protocol 'vqa' is not one of cloze, mmbench",
             "circular: true\n": "circular: true needs protocol: mmbench",
             "protocol: mmbench\ncircular: 1\n": "circular: 1 is not true or false"}
    for extra, message in cases.items():
        (tmp_path / "m.yaml").write_text(base + extra)
        with pytest.raises(EvalError, match=message):
            load_task(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text(base)
    task = load_task(tmp_path / "m.yaml")
    assert (task.protocol, task.circular, task.protocol_name) == ("cloze", False, "cloze")
    (tmp_path / "c.yaml").write_text((EXAMPLES / "captions.yaml").read_text().replace(
        "captions.jsonl", str(EXAMPLES / "captions.jsonl")) + "protocol: mmbench\n")
    with pytest.raises(EvalError, match="unknown key 'protocol' for a task of kind caption_retrieval"):
        load_task(tmp_path / "c.yaml")


@pytest.mark.parametrize("extra, message", [
    ("protcol: mmbench\n", "unknown key 'protcol' for a task of kind image_choice"),
    ("chat_templat: false\n", "unknown key 'chat_templat'"),
    ("subset: 5\n", "subset: 5 is not a mapping of size and seed"),
    ("subset: {size: abc}\n", "subset.size: 'abc' is not a whole number"),
    ("version: one\n", "version: 'one' is not a whole number"),
    ("chat_template: [a]\n", r"chat_template: \['a'\] is not one of auto, true, false"),
    ("metric: f1\n", "metric: an image_choice task reports acc, not 'f1'"),
])
def test_a_task_file_with_a_typo_or_a_wrong_type_is_refused(tmp_path, extra, message):
    (tmp_path / "d.jsonl").write_text(json.dumps(_row()) + "\n")
    (tmp_path / "m.yaml").write_text("task: m\nkind: image_choice\n"
                                     "source: {type: jsonl, path: d.jsonl}\n" + extra)
    with pytest.raises(EvalError, match=message):
        load_task(tmp_path / "m.yaml")
