"""Evaluation tasks are data: one YAML file each, loaded here, with no code per task.

```yaml
task: demo_color_shape_val        # unique name
version: 1
kind: image_choice                # image_choice | caption_retrieval | lm_eval
source: {type: jsonl, path: color_shape_val.jsonl}   # relative to this YAML's folder
prompt: "{question}"              # format string over the item's fields -> question text
chat_template: auto               # auto: the processor's chat template when it has one;
                                  # false: a plain prompt (base models); true: require one
protocol: cloze                   # image_choice: cloze | mmbench (default cloze)
circular: false                   # mmbench only: CircularEval (default false)
subset: {size: 64, seed: 0}       # seeded shuffle, then the first `size`; omit for all
```

Sources (image kinds): `jsonl` (rows `{"image": "images/0001.png", "question": ..., "choices":
[...], "answer": ...}`, images relative to the JSONL's folder), `datasets` (any
`datasets.load_dataset` source: `path: json|parquet|imagefolder|<hub id>`, `data_files` relative to
the YAML, `split`, optional `name`), `tsv` (VLMEvalKit / MMBench, read as VLMEvalKit reads it:
pandas' `read_csv(sep="\t")`, so empty and "NaN"-like cells are missing; `index`, base64
`image`, `question`, option columns `A`, `B`, ... (missing ones dropped), `answer` letter,
optional `hint`, `category`, `split`). A TSV `image` that is a short digit string names another
row's `index` whose image it reuses (decoded once, shared); a row whose integer `index` is 10^6·k +
i (k >= 1) is a circular copy of row `index` i (MMBench's layout: the same question with its
options rotated) and becomes one of that item's option orders, not an item of its own. Every
source takes `columns: {field: column}` to rename its columns. An answer is one of the choices,
a choice index (int) or a choice letter (A, B, ...). Optional row fields of every source: `hint`
(shown with the question; missing, NaN or empty: none) and `category` (per-category accuracy,
`acc/<category>`).

Protocols (`image_choice`): `cloze` scores each choice's text as the continuation of the
question (the hint, when present, is a line before it). `mmbench` shows VLMEvalKit's MMBench text
(`vlmexp.eval.prompt.mmbench_text`: hint, question, lettered options, instruction line) and scores
each option's letter; with `circular: true` (CircularEval) the item is asked once per rotation of
its options (the TSV's circular copies when it has them, else every circular shift) and counts
as right only if every rotation is. Either text is the user message of the processor's chat
template when the task uses one.

`caption_retrieval` rows have `image` and either `captions` (K candidates) + `answer` (the right
one), or a single `caption`: then the candidates are that caption plus `distractors` (YAML key,
default 3) captions of other rows, sampled with the subset seed and the row index.
Its `prompt` is the fixed text shown with the image (default "Describe the image.").

`lm_eval` tasks name an lm-eval task (`lm_eval_task`), an optional `include_path` folder of
lm-eval task YAMLs (relative to the YAML) and the `metric` to report (default `acc`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vlmexp.errors import EvalError
from vlmexp.eval.prompt import LETTERS, mmbench_text

KINDS = ("image_choice", "caption_retrieval", "lm_eval")
SOURCES = ("jsonl", "datasets", "tsv")
PROTOCOLS = ("cloze", "mmbench")  # how image_choice items are shown and scored
PRIMARY_METRIC = {"image_choice": "acc", "caption_retrieval": "recall@1"}
_COMMON_KEYS = {"task", "version", "kind", "subset"}
# the keys each kind of task file may have (anything else is refused: a typo would be ignored)
TASK_KEYS = {
    "image_choice": _COMMON_KEYS | {"source", "prompt", "chat_template", "protocol", "circular",
                                    "metric"},
    "caption_retrieval": _COMMON_KEYS | {"source", "prompt", "chat_template", "distractors"},
    "lm_eval": _COMMON_KEYS | {"lm_eval_task", "include_path", "metric"},
}
CHAT_TEMPLATE = {"auto": None, True: True, False: False}  # YAML value -> image_prompt's switch
DEFAULT_CAPTION_PROMPT = "Describe the image."
CIRCULAR_STRIDE = 1_000_000  # MMBench: circular copy k of row i has index i + k * 10^6
IMAGE_REF_MAX = 64  # VLMEvalKit: an image field this short names another row's index


@dataclass(frozen=True)
class Item:
    """One image item: the image (a path, raw bytes or a PIL image), question text and choices.

    `index` is the row's position in the source, a stable id for per-item results.
    """

    index: int
    image: Any
    question: str
    choices: tuple[str, ...]
    answer: str
    where: str  # "file, row N" for error messages
    hint: str | None = None
    category: str | None = None
    split: str | None = None
    copies: tuple[tuple[str, ...], ...] = ()  # the data's other orders of `choices` (MMBench)

    def load_image(self) -> Any:
        from PIL import Image

        try:
            if isinstance(self.image, (str, Path)):
                return Image.open(self.image).convert("RGB")
            if isinstance(self.image, bytes):
                return Image.open(io.BytesIO(self.image)).convert("RGB")
            return self.image.convert("RGB")
        except Exception as err:  # PIL raises several types for unreadable images
            raise EvalError(f"{self.where}: unreadable image ({err})") from err


@dataclass(frozen=True)
class Variant:
    """One prompt of an item: the text shown with the image, the answers scored after it
    (choice texts for cloze, letters for mmbench), the options in the order shown, and the
    position of the right answer."""

    text: str
    answers: tuple[str, ...]
    options: tuple[str, ...]
    gold: int


def rotations(choices: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every circular shift of the options, the original order first (CircularEval).

    Example:
        >>> rotations(("a", "b", "c"))
        [('a', 'b', 'c'), ('b', 'c', 'a'), ('c', 'a', 'b')]
    """
    return [choices[k:] + choices[:k] for k in range(len(choices))]


@dataclass
class Task:
    """A loaded task: its definition and, for image kinds, its items (validated).

    Example:
        >>> task = load_task("evals/examples/shapes_jsonl.yaml")  # doctest: +SKIP
        >>> task.kind, len(task.subset_indices()) > 0  # doctest: +SKIP
        ('image_choice', True)
    """

    name: str
    version: int
    kind: str
    path: Path
    prompt: str = "{question}"
    chat_template: bool | None = None  # None: the processor's template when it has one
    subset_size: int | None = None
    subset_seed: int = 0
    metric: str = "acc"
    protocol: str = "cloze"
    circular: bool = False
    lm_eval_task: str | None = None
    include_path: Path | None = None
    items: list[Item] = field(default_factory=list)

    @property
    def primary_metric(self) -> str:
        return PRIMARY_METRIC.get(self.kind, self.metric)

    @property
    def protocol_name(self) -> str:
        """`cloze`, `mmbench` or `mmbench-circular`: how scores were made, for the identity."""
        return f"{self.protocol}-circular" if self.circular else self.protocol

    def variants(self, item: Item) -> list[Variant]:
        """The prompts `item` is scored on: one, or one per option order under CircularEval.

        Example:
            >>> item = Item(0, None, "Colour?", ("red", "blue"), "blue", "row 0")
            >>> [v.answers for v in Task("t", 1, "image_choice", Path("t.yaml")).variants(item)]
            [('red', 'blue')]
            >>> mm = Task("t", 1, "image_choice", Path("t.yaml"), protocol="mmbench", circular=True)
            >>> [(v.options, v.gold) for v in mm.variants(item)]
            [(('red', 'blue'), 1), (('blue', 'red'), 0)]
        """
        if self.protocol == "cloze":
            text = item.question if item.hint is None else f"{item.hint}\n{item.question}"
            return [Variant(text, item.choices, item.choices, item.choices.index(item.answer))]
        orders = [item.choices]
        if self.circular:
            orders += list(item.copies) if item.copies else rotations(item.choices)[1:]
        return [Variant(mmbench_text(item.question, order, item.hint), tuple(LETTERS[:len(order)]),
                        order, order.index(item.answer)) for order in orders]

    def subset_indices(self, n_total: int | None = None) -> list[int]:
        """Positions of the deterministic subset: seeded shuffle of 0..n-1, then the first `size`."""
        n = len(self.items) if n_total is None else n_total
        order = list(range(n))
        if self.subset_size is not None:
            random.Random(self.subset_seed).shuffle(order)
            order = order[: self.subset_size]
        if not order:
            raise EvalError(f"{self.path}: task {self.name!r} has an empty subset ({n} rows, size {self.subset_size})")
        return order


def _integer(path: Path, key: str, value: Any) -> int | None:
    """`value` as an int (None stays None), or an EvalError naming the key."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"{key}: {value!r} is not a whole number")
    return value


def _fail(path: Path, msg: str) -> EvalError:
    return EvalError(f"{path}: {msg}")


def load_task(path: str | Path) -> Task:
    """Load and validate one task YAML (and, for image kinds, its data).

    Example:
        >>> task = load_task("evals/examples/shapes_jsonl.yaml")  # doctest: +SKIP
        >>> task.name  # doctest: +SKIP
        'example_shapes_jsonl'
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise _fail(path, "task file not found") from err
    except yaml.YAMLError as err:
        raise _fail(path, f"not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(spec, dict):
        raise _fail(path, "a task file must be a mapping")
    for key in ("task", "kind"):
        if key not in spec:
            raise _fail(path, f"missing key {key!r}")
    kind = spec["kind"]
    if kind not in KINDS:
        raise _fail(path, f"kind {kind!r} is not one of {', '.join(KINDS)}")
    unknown = sorted(set(spec) - TASK_KEYS[kind])
    if unknown:  # a typo would otherwise silently keep the default
        raise _fail(path, f"unknown key {unknown[0]!r} for a task of kind {kind} (keys: "
                          f"{', '.join(sorted(TASK_KEYS[kind]))})")
    subset = spec.get("subset") or {}
    if not isinstance(subset, dict) or set(subset) - {"size", "seed"}:
        raise _fail(path, f"subset: {subset!r} is not a mapping of size and seed")
    if kind == "image_choice" and "metric" in spec and spec["metric"] != "acc":
        raise _fail(path, f"metric: an image_choice task reports acc, not {spec['metric']!r}")
    size = _integer(path, "subset.size", subset.get("size"))
    task = Task(
        name=str(spec["task"]), version=_integer(path, "version", spec.get("version", 1)),
        kind=kind, path=path,
        prompt=str(spec.get("prompt", DEFAULT_CAPTION_PROMPT if kind == "caption_retrieval" else "{question}")),
        subset_size=size, subset_seed=_integer(path, "subset.seed", subset.get("seed", 0)),
        metric=str(spec.get("metric", "acc")),
    )
    protocol, circular = spec.get("protocol", "cloze"), spec.get("circular", False)
    if protocol not in PROTOCOLS:
        raise _fail(path, f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if not isinstance(circular, bool):
        raise _fail(path, f"circular: {circular!r} is not true or false")
    if circular and protocol != "mmbench":
        raise _fail(path, "circular: true needs protocol: mmbench (cloze scores do not depend "
                          "on the order of the choices)")
    task.protocol, task.circular = protocol, circular
    template = spec.get("chat_template", "auto")
    if not isinstance(template, (str, bool)) or template not in CHAT_TEMPLATE:
        raise _fail(path, f"chat_template: {template!r} is not one of auto, true, false")
    task.chat_template = CHAT_TEMPLATE[template]
    if kind == "lm_eval":
        if "lm_eval_task" not in spec:
            raise _fail(path, "missing key 'lm_eval_task'")
        task.lm_eval_task = str(spec["lm_eval_task"])
        if spec.get("include_path"):
            task.include_path = (path.parent / spec["include_path"]).resolve()
            if not task.include_path.is_dir():
                raise _fail(path, f"include_path {spec['include_path']!r} is not a folder")
        if task.subset_size == 0:
            raise _fail(path, f"task {task.name!r} has an empty subset (size 0)")
        return task
    source = spec.get("source")
    if not isinstance(source, dict) or source.get("type") not in SOURCES:
        raise _fail(path, f"source.type must be one of {', '.join(SOURCES)}")
    rows = list(_read_rows(path, source))
    task.items = _make_items(task, spec, rows)
    task.subset_indices()  # raises on an empty subset
    return task


def load_tasks(paths: str | Path | Iterable[str | Path]) -> list[Task]:
    """Load task YAMLs from files and folders (a folder: its `*.yaml` files, sorted; not recursive).

    Example:
        >>> [t.name for t in load_tasks(["evals/examples"])][:1]  # doctest: +SKIP
        ['example_captions']
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    tasks: list[Task] = []
    for p in map(Path, paths):
        if p.is_dir():
            tasks += [load_task(f) for f in sorted([*p.glob("*.yaml"), *p.glob("*.yml")])]
        else:
            tasks.append(load_task(p))
    seen: dict[str, Path] = {}
    for t in tasks:
        if t.name in seen:
            raise _fail(t.path, f"task name {t.name!r} already defined in {seen[t.name]}")
        seen[t.name] = t.path
    return tasks


# --- sources -----------------------------------------------------------------------------------

# A row: (where, base folder for relative image paths, the row's fields after column renaming)
Row = tuple[str, Path, dict[str, Any]]


def _rename(fields: dict[str, Any], columns: Mapping[str, str], where: str) -> dict[str, Any]:
    out = dict(fields)
    for name, column in columns.items():
        if column not in fields:
            raise EvalError(f"{where}: column {column!r} (for {name!r}) not in the data (has {', '.join(map(str, fields))})")
        out[name] = fields[column]
    return out


def _read_rows(path: Path, source: Mapping[str, Any]) -> Iterable[Row]:
    columns = source.get("columns") or {}
    kind = source["type"]
    if kind == "datasets":
        yield from _read_datasets(path, source, columns)
        return
    if "path" not in source:
        raise _fail(path, "source.path is missing")
    data = (path.parent / source["path"]).resolve()
    if not data.is_file():
        raise _fail(path, f"data file {source['path']!r} not found")
    if kind == "jsonl":
        with data.open() as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                where = f"{data}, row {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise EvalError(f"{where}: not valid JSON ({err})") from err
                yield where, data.parent, _rename(row, columns, where)
    else:
        yield from _read_tsv(data, columns)


def _missing(value: Any) -> bool:
    """An absent cell: None, NaN (pandas reads empty and "NaN"-like TSV cells so) or blank."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


COPY_OF = "_copy_of"  # a TSV row's field: the index of the row it is a circular copy of


def _is_copy_key(key: str) -> bool:
    return key.isdigit() and int(key) >= CIRCULAR_STRIDE


def _is_image_ref(value: str) -> bool:
    return len(value) <= IMAGE_REF_MAX and value.isdigit()


def _read_tsv(data: Path, columns: Mapping[str, str]) -> Iterable[Row]:
    """A VLMEvalKit TSV's rows, as VLMEvalKit reads them (vlmeval/dataset/image_base.py).

    Images: an `image` that is a short digit string is the `index` of the row whose image it
    reuses (VLMEvalKit stores each image once); each image is decoded once and its bytes are
    shared. Options: the columns A, B, ... that are present and not missing. A row whose
    integer index is i + k·10^6 (k >= 1) while row i exists is marked as a circular copy of i.
    """
    import pandas as pd

    try:
        frame = pd.read_csv(data, sep="\t")  # VLMEvalKit's load() of a .tsv
    except (ValueError, pd.errors.ParserError) as err:
        raise EvalError(f"{data}: not a readable TSV ({str(err).splitlines()[0]})") from err
    rows = []
    for n, record in enumerate(frame.to_dict("records")):
        where = f"{data}, row {n}"
        row = _rename(record, columns, where)
        if "image" not in row:
            raise EvalError(f"{where}: column 'image' not in the data")
        key = str(row["index"]) if "index" in row else str(n)
        rows.append((where, key, row))
    raw = {key: row["image"] for _, key, row in rows}
    decoded: dict[str, bytes] = {}
    mains = {key for _, key, _ in rows if not _is_copy_key(key)}

    def image_of(key: str, where: str, seen: tuple[str, ...] = ()) -> bytes:
        if key in decoded:
            return decoded[key]
        value = raw[key]
        if _missing(value):
            raise EvalError(f"{where}: no image")
        value = str(value).strip()
        if _is_image_ref(value):
            if value not in raw or value == key or value in seen:
                raise EvalError(f"{where}: image {value!r} names no other row's index with an image")
            decoded[key] = image_of(value, where, (*seen, key))
            return decoded[key]
        try:
            image = base64.b64decode(value, validate=True)
            _check_image_bytes(image)
        except (binascii.Error, ValueError) as err:
            raise EvalError(f"{where}: broken base64 image ({err})") from err
        decoded[key] = image
        return image

    for where, key, row in rows:
        row["image"] = image_of(key, where)
        if "choices" not in row:
            letters = [c for c in LETTERS if c in row and not _missing(row[c])]
            if letters != list(LETTERS[:len(letters)]):
                raise EvalError(f"{where}: options {', '.join(letters)} leave a gap; options "
                                f"must run A, B, C, ... without one")
            row["choices"] = [str(row[c]) for c in letters]
            answer = row.get("answer")
            if isinstance(answer, str) and len(answer) == 1 and answer in letters:
                row["answer"] = letters.index(answer)  # the letter, even where an option's text is one
        if _is_copy_key(key) and str(int(key) % CIRCULAR_STRIDE) in mains:
            row[COPY_OF] = str(int(key) % CIRCULAR_STRIDE)
        row.setdefault("index", key)
        yield where, data.parent, row


def _check_image_bytes(raw: bytes) -> None:
    from PIL import Image

    try:
        Image.open(io.BytesIO(raw)).verify()
    except Exception as err:  # PIL raises several types for bad data
        raise ValueError(f"not an image: {err}") from err


def _read_datasets(path: Path, source: Mapping[str, Any], columns: Mapping[str, str]) -> Iterable[Row]:
    import datasets

    target = str(source.get("path", ""))
    if not target:
        raise _fail(path, "source.path is missing (json, parquet, imagefolder or a hub id)")
    kwargs: dict[str, Any] = {"split": source.get("split", "test")}
    if source.get("name"):
        kwargs["name"] = source["name"]
    files = source.get("data_files")
    if files is not None:
        def resolve(f: Any) -> Any:
            if isinstance(f, str):
                return str((path.parent / f).resolve())
            if isinstance(f, Mapping):
                return {k: resolve(v) for k, v in f.items()}
            return [resolve(x) for x in f]

        kwargs["data_files"] = resolve(files)
    elif source.get("data_dir"):
        kwargs["data_dir"] = str((path.parent / source["data_dir"]).resolve())
    try:
        ds = datasets.load_dataset(target, **kwargs)
    except Exception as err:  # datasets raises many types for missing files, splits, hubs
        raise _fail(path, f"datasets could not load {target!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    base = path.parent
    if isinstance(files, str):
        base = (path.parent / files).resolve().parent
    for n, row in enumerate(ds):
        where = f"{path} ({target}), row {n}"
        row = _rename(dict(row), columns, where)
        image = row.get("image")
        if isinstance(image, Mapping):  # an undecoded datasets Image: {"bytes": ..., "path": ...}
            row["image"] = image.get("bytes") or image.get("path")
        yield where, base, row


# --- items -------------------------------------------------------------------------------------

def _answer(row: dict[str, Any], choices: list[str], where: str) -> str:
    answer = row["answer"]
    if isinstance(answer, bool):
        raise EvalError(f"{where}: answer {answer!r} is not among the choices {choices}")
    if isinstance(answer, int):
        if 0 <= answer < len(choices):
            return choices[answer]
    else:
        answer = str(answer)
        if answer in choices:
            return answer
        if len(answer) == 1 and answer in LETTERS and LETTERS.index(answer) < len(choices):
            return choices[LETTERS.index(answer)]
    raise EvalError(f"{where}: answer {answer!r} is not among the choices {choices}")


def _image(row: dict[str, Any], base: Path, where: str) -> Any:
    if "image" not in row or row["image"] is None:
        raise EvalError(f"{where}: no image")
    image = row["image"]
    if isinstance(image, str):
        file = (base / image).resolve()
        if not file.is_file():
            raise EvalError(f"{where}: image {image!r} not found")
        return file
    return image


def _optional(row: dict[str, Any], name: str) -> str | None:
    value = row.get(name)
    return None if _missing(value) else str(value)


def _make_items(task: Task, spec: Mapping[str, Any], rows: list[Row]) -> list[Item]:
    items: list[Item] = []
    positions: dict[str, int] = {}  # a TSV row's index -> position of its item
    copies: list[tuple[str, dict[str, Any]]] = []
    if task.kind == "caption_retrieval":
        k = int(spec.get("distractors", 3))
        pool = [r[2].get("caption") for r in rows]
    for where, base, row in rows:
        if row.get(COPY_OF) is not None:
            copies.append((where, row))
            continue
        n = len(items)
        image = _image(row, base, where)
        if task.kind == "image_choice":
            for key in ("choices", "answer"):
                if key not in row:
                    raise EvalError(f"{where}: field {key!r} not in the data")
            choices = [str(c) for c in row["choices"]]
            if len(choices) < 2:
                raise EvalError(f"{where}: needs at least two choices, got {choices}")
            answer = _answer(row, choices, where)
            try:
                question = task.prompt.format(**row)
            except (KeyError, IndexError) as err:
                raise EvalError(f"{where}: prompt {task.prompt!r} names a missing field {err}") from err
        else:
            question = task.prompt
            if "captions" in row:
                if "answer" not in row:
                    raise EvalError(f"{where}: field 'answer' not in the data")
                choices = [str(c) for c in row["captions"]]
                answer = _answer(row, choices, where)
            elif "caption" in row:
                answer = str(row["caption"])
                others = sorted({str(c) for c in pool if c is not None and str(c) != answer})
                if len(others) < k:
                    raise EvalError(f"{where}: only {len(others)} other captions for {k} distractors")
                choices = random.Random(task.subset_seed * 1_000_003 + n).sample(others, k) + [answer]
                random.Random(task.subset_seed * 1_000_003 + n + 1).shuffle(choices)
            else:
                raise EvalError(f"{where}: field 'captions' (or 'caption') not in the data")
        if "index" in row:
            positions[str(row["index"])] = n
        items.append(Item(n, image, question, tuple(choices), answer, where,
                          hint=_optional(row, "hint"), category=_optional(row, "category"),
                          split=_optional(row, "split")))
    for where, row in copies:  # MMBench's circular copies: more orders of their item's options
        item = items[positions[row[COPY_OF]]]
        order = tuple(str(c) for c in row.get("choices", ()))
        answer = _answer(row, list(order), where) if "answer" in row and order else None
        if sorted(order) != sorted(item.choices) or answer != item.answer:
            raise EvalError(f"{where}: a circular copy of index {row[COPY_OF]} must have its "
                            f"options {list(item.choices)} and answer {item.answer!r}, has "
                            f"{list(order)} and {answer!r}")
        items[item.index] = replace(item, copies=(*item.copies, order))
    return items
