"""Synthetic, seeded data for the demo zoo: shapes on noisy backgrounds and ordered word lists.

Three skills, kept apart on purpose:

- position (pretraining of `base`): "Where is the shape?" -> "top left"; no colour, no shape name;
- colour/shape (`vqa-expert`): "What colour is the shape?" -> "red", "What shape is this?" -> "circle";
- next item (`text-expert`): "Question: What comes after seven?\\nAnswer:" -> " eight", a text skill
  that rests on the ordered lists the base recites in pretraining.

Everything is drawn from `random.Random(seed)`, so the same seed gives the same items. The
evaluation tasks in `evals/demo/` are written by this module:

    python -m vlmexp.zoo.data --write-evals evals/demo
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 32  # 4 x 4 patches of 8 pixels
SHAPE_SIZE = (13, 16)  # pixels, inclusive range
OUTLINE = 1  # pixels
NOISE = 60  # grey-level spread of the background noise

LISTS: dict[str, list[str]] = {  # ordered lists with no word in two of them
    "numbers": (
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty"
    ).split(),
    "ordinals": (
        "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
        "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
    ).split(),
    "letters": list("abcdefghijklmnopqrstuvwxyz"),
    "months": (
        "january february march april may june july august september october november december"
    ).split(),
    "days": "monday tuesday wednesday thursday friday saturday sunday".split(),
    "greek": (
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
        "sigma tau upsilon phi chi psi omega"
    ).split(),
    "planets": "mercury venus earth mars jupiter saturn uranus neptune".split(),
    "roman": "I II III IV V VI VII VIII IX X XI XII XIII XIV XV XVI XVII XVIII XIX XX".split(),
    "elements": "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca".split(),
    "zodiac": (
        "aries taurus gemini cancer leo virgo libra scorpio sagittarius capricorn aquarius pisces"
    ).split(),
    "solfege": "do re mi fa sol la ti".split(),
    "seasons": "spring summer autumn winter".split(),
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 70, 235),
    "yellow": (235, 220, 30),
    "purple": (150, 40, 210),
    "orange": (245, 140, 10),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
# 3 x 3 grid cells, row-major; the name is what the base learns to say.
POSITIONS = (
    "top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right"
)

COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is this?"
POSITION_QUESTION = "Where is the shape?"
CAPTION_QUESTION = "Describe the image."
NUM_CHOICES = 4

# Split sizes of the shipped evaluation tasks (the rest of the next-item questions train).
COLOR_SHAPE_SPLIT = 256  # each split: one item is 0.4 points, so rungs of a quarter stay informative
NEXT_ITEM_SPLIT = 60
EVAL_SEEDS = {"val": 1001, "test": 2002}
NEXT_ITEM_SEED = 7


@dataclass(frozen=True)
class ImageItem:
    """One image question: the answer is one of `choices`."""

    image: Image.Image
    question: str
    choices: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class TextItem:
    """One text question; `choices[answer]` is the right one."""

    question: str
    choices: tuple[str, ...]
    answer: int


def vocabulary() -> list[str]:
    """Every word and punctuation mark the zoo's prompts and answers use, in a fixed order."""
    words: list[str] = []
    for text in (
        COLOUR_QUESTION, SHAPE_QUESTION, POSITION_QUESTION, CAPTION_QUESTION,
        "Question: What comes after", "Answer:", "the shape is at",
        *POSITIONS, *COLOURS, *SHAPES, *(w for ws in LISTS.values() for w in ws),
    ):
        for word in text.replace("?", " ? ").replace(":", " : ").replace(".", " . ").split():
            if word not in words:
                words.append(word)
    return words


# ---- images ---------------------------------------------------------------------------------


def render(shape: str, colour: str, cell: int, rng: random.Random) -> Image.Image:
    """A `shape` in `colour` inside grid cell `cell` (0..8) on a grey noise background."""
    low = rng.randint(40, 90)
    noise = Image.frombytes("L", (IMAGE_SIZE, IMAGE_SIZE), rng.randbytes(IMAGE_SIZE * IMAGE_SIZE))
    noise = noise.point(lambda v, low=low: low + v * NOISE // 255)
    image = Image.merge("RGB", (noise, noise, noise))
    # The shape covers a 2 x 2 block of the model's 8-pixel patches: cell (row, col) of the 3 x 3
    # grid is centred on pixel (8 + 8 col, 8 + 8 row), so every patch sees one quarter of it.
    size = rng.randint(*SHAPE_SIZE)
    row, col = divmod(cell, 3)
    cx, cy = 8 + 8 * col, 8 + 8 * row
    x0, y0 = cx - size // 2, cy - size // 2
    x1, y1 = x0 + size - 1, y0 + size - 1
    draw = ImageDraw.Draw(image)
    # A black outline carries the shape in the same pixels whatever the colour.
    style = {"fill": COLOURS[colour], "outline": (0, 0, 0), "width": OUTLINE}
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), **style)
    elif shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), **style)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], **style)
    elif shape == "cross":
        w = max(2, size // 5)
        draw.polygon([(cx - w, y0), (cx + w, y0), (cx + w, cy - w), (x1, cy - w), (x1, cy + w),
                      (cx + w, cy + w), (cx + w, y1), (cx - w, y1), (cx - w, cy + w),
                      (x0, cy + w), (x0, cy - w), (cx - w, cy - w)], **style)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], **style)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def _choices(answer: str, pool: tuple[str, ...] | list[str], rng: random.Random) -> tuple[str, ...]:
    others = rng.sample([w for w in pool if w != answer], NUM_CHOICES - 1)
    choices = [answer, *others]
    rng.shuffle(choices)
    return tuple(choices)


def _random_scene(rng: random.Random) -> tuple[str, str, int, Image.Image]:
    shape, colour, cell = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randrange(9)
    return shape, colour, cell, render(shape, colour, cell, rng)


def color_shape_items(n: int, seed: int) -> list[ImageItem]:
    """`n` colour or shape questions (alternating), each with 4 choices."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        shape, colour, _, image = _random_scene(rng)
        if i % 2 == 0:
            items.append(ImageItem(image, COLOUR_QUESTION, _choices(colour, tuple(COLOURS), rng), colour))
        else:
            items.append(ImageItem(image, SHAPE_QUESTION, _choices(shape, SHAPES, rng), shape))
    return items


def position_items(n: int, seed: int) -> list[tuple[Image.Image, str, str]]:
    """`n` (image, question, answer) position captions: the base's image pretraining."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        _, _, cell, image = _random_scene(rng)
        if i % 2 == 0:
            items.append((image, POSITION_QUESTION, POSITIONS[cell]))
        else:
            items.append((image, CAPTION_QUESTION, f"the shape is at the {POSITIONS[cell]}"))
    return items


# ---- text -----------------------------------------------------------------------------------


def recitations(n: int, seed: int) -> list[str]:
    """`n` runs of 3+ consecutive list items, in order: the base's text pretraining."""
    rng = random.Random(seed)
    runs = []
    names = list(LISTS)
    for _ in range(n):
        words = LISTS[rng.choice(names)]
        length = rng.randint(3, len(words))
        start = rng.randint(0, len(words) - length)
        runs.append(" ".join(words[start:start + length]))
    return runs


def next_item_questions() -> list[tuple[str, str, tuple[str, ...]]]:
    """Every (question, answer, distractors) of the next-item skill, in a fixed order.

    The distractors start with the two hard ones, the item itself and the one before it (so
    that "a neighbour of X" is not enough; at the list's start, another item), then the rest.
    """
    out = []
    for words in LISTS.values():
        for i, word in enumerate(words[:-1]):
            hard = [word] + ([words[i - 1]] if i > 0 else [])
            rest = [w for w in words if w not in hard and w != words[i + 1]]
            out.append((f"What comes after {word}?", words[i + 1], (*hard, *rest)))
    return out


def next_item_splits() -> dict[str, list[TextItem]]:
    """The next-item questions split into disjoint train / val / test sets of TextItems."""
    rng = random.Random(NEXT_ITEM_SEED)
    questions = next_item_questions()
    rng.shuffle(questions)
    cut = {"val": questions[:NEXT_ITEM_SPLIT],
           "test": questions[NEXT_ITEM_SPLIT:2 * NEXT_ITEM_SPLIT],
           "train": questions[2 * NEXT_ITEM_SPLIT:]}
    splits: dict[str, list[TextItem]] = {}
    for split, rows in cut.items():
        items = []
        for question, answer, distractors in rows:
            choices = [answer, *distractors[:2], rng.choice(distractors[2:])]
            rng.shuffle(choices)
            items.append(TextItem(question, tuple(choices), choices.index(answer)))
        splits[split] = items
    return splits


def next_item_text(question: str) -> str:
    """The lm-eval `doc_to_text` of a next-item question (the text-expert trains on exactly this)."""
    return f"Question: {question}\nAnswer:"


# ---- evaluation tasks -----------------------------------------------------------------------

_IMAGE_TASK = """\
# Demo zoo: colour and shape questions about synthetic images ({split} split).
# Written by `python -m vlmexp.zoo.data --write-evals DIR`; do not edit by hand.
task: demo_color_shape_{split}
version: 1
kind: image_choice
source: {{type: jsonl, path: color_shape_{split}.jsonl}}
prompt: "{{question}}"
{subset}"""

_TEXT_TASK = """\
# Demo zoo: "What comes after seven?" over ordered word lists ({split} split), run by lm-eval.
# Written by `python -m vlmexp.zoo.data --write-evals DIR`; do not edit by hand.
task: demo_next_item_{split}
version: 1
kind: lm_eval
lm_eval_task: demo_next_item_{split}
include_path: lm_eval
metric: acc
{subset}"""

_LM_EVAL_TASK = """\
# lm-eval task. data_files is relative to this file: vlmexp's loader makes it absolute (lm-eval
# on its own would look for it in the working directory).
task: demo_next_item_{split}
dataset_path: json
dataset_kwargs:
  data_files:
    test: next_item_{split}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1
"""

_SUBSET = {"val": "subset: {size: 256, seed: 0}\n", "test": ""}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_evals(out: str | Path) -> Path:
    """Write the demo evaluation tasks (YAML, JSONL, PNG) into `out`; deterministic."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "lm_eval").mkdir(parents=True, exist_ok=True)
    text_splits = next_item_splits()
    for split, seed in EVAL_SEEDS.items():
        rows = []
        for i, item in enumerate(color_shape_items(COLOR_SHAPE_SPLIT, seed)):
            name = f"images/{split}_{i:04d}.png"
            item.image.save(out / name, format="PNG", optimize=False)
            rows.append({"image": name, "question": item.question,
                         "choices": list(item.choices), "answer": item.answer})
        _write_jsonl(out / f"color_shape_{split}.jsonl", rows)
        (out / f"color_shape_{split}.yaml").write_text(
            _IMAGE_TASK.format(split=split, subset=_SUBSET[split]))
        _write_jsonl(out / "lm_eval" / f"next_item_{split}.jsonl", [
            {"question": it.question, "choices": list(it.choices), "answer": it.answer}
            for it in text_splits[split]])
        (out / f"next_item_{split}.yaml").write_text(
            _TEXT_TASK.format(split=split, subset=_SUBSET[split]))
        (out / "lm_eval" / f"next_item_{split}.yaml").write_text(_LM_EVAL_TASK.format(split=split))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmexp.zoo.data", description=__doc__.splitlines()[0])
    parser.add_argument("--write-evals", metavar="DIR", required=True, help="folder to write the tasks into")
    args = parser.parse_args(argv)
    print(write_evals(args.write_evals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
