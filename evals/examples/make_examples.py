"""Regenerate the small example tasks in this folder (deterministic): `python evals/examples/make_examples.py`.

One example per source kind: JSONL + PNG files, a `datasets` JSON file with its own column names,
an MMBench-style TSV with base64 images, caption retrieval, and a local lm-eval task. Two
examples of the MMBench protocol: `mmbench_dev.tsv` laid out as VLMEvalKit's MMBench files are
(images stored once and named by `index`, hints on some rows, categories, 4 and 3 options, the
circular copies at index + k·10^6) and `scienceqa.jsonl`, ScienceQA-style rows (a context
`hint`, 2 to 5 options, the answer's position, a `subject`).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw(color: str, shape: str, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (6, 6, size - 6, size - 6)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(size // 2, 5), (size - 5, size - 6), (5, size - 6)], fill=fill)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(img: Image.Image) -> str:
    return base64.b64encode(png(img)).decode()


# MMBench-style rows: (image: a new (colour, shape) or the index of the row whose image it shares,
# question, hint or None, options, answer position, category)
COLOUR_Q, SHAPE_Q = "What colour is the shape?", "Which shape is shown?"
MMBENCH_ROWS = [
    (("red", "circle"), COLOUR_Q, None, ["red", "green", "blue", "yellow"], 0, "attribute_recognition"),
    (0, SHAPE_Q, "The picture shows one shape on a white background.", ["square", "circle", "triangle"],
     1, "shape_recognition"),
    (("blue", "square"), COLOUR_Q, "Look at the colour that fills the shape.",
     ["yellow", "blue", "red", "green"], 1, "attribute_recognition"),
    (2, SHAPE_Q, None, ["circle", "triangle", "square"], 2, "shape_recognition"),
    (("green", "triangle"), SHAPE_Q, "A shape with three corners is a triangle.",
     ["circle", "square", "triangle"], 2, "shape_recognition"),
    (4, COLOUR_Q, None, ["green", "yellow", "blue", "red"], 0, "attribute_recognition"),
    (("yellow", "circle"), COLOUR_Q, "The shape is one of the colours listed.",
     ["blue", "red", "yellow", "green"], 2, "attribute_recognition"),
    (6, SHAPE_Q, None, ["circle", "triangle", "square"], 0, "shape_recognition"),
]

# ScienceQA-style rows: (colour, shape, question, hint ("" for none, as ScienceQA), choices,
# answer position, subject)
SCIENCEQA_ROWS = [
    ("red", "circle", "Which colour is the shape?", "A student drew a shape with one crayon.",
     ["blue", "red"], 1, "natural science"),
    ("blue", "square", "Which shape did the student draw?", "The shape has four equal sides.",
     ["triangle", "circle", "square"], 2, "natural science"),
    ("green", "triangle", "What colour is the shape?", "", ["green", "yellow", "red", "blue"], 0,
     "language science"),
    ("yellow", "circle", "Which colour is the shape?", "The crayon was the colour of the sun.",
     ["purple", "orange", "blue", "yellow", "red"], 3, "social science"),
    ("green", "square", "Which shape is shown?", "", ["circle", "square"], 1, "social science"),
    ("red", "triangle", "Which colour is the shape?", "The shape is the colour of a stop sign.",
     ["red", "green", "blue"], 0, "language science"),
]


def write_mmbench(path: Path) -> None:
    """VLMEvalKit's MMBench layout: each image once, other rows name its `index`; then the
    circular copies (index + k·10^6, options rotated by k, image naming the original row)."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "split"]
    rows = []
    for k in range(4):
        for i, (image, question, hint, options, answer, category) in enumerate(MMBENCH_ROWS):
            if k >= len(options):
                continue
            order = options[k:] + options[:k]
            if k == 0:
                cell = str(image) if isinstance(image, int) else b64(draw(*image))
            else:
                cell = str(i)
            letter = "ABCD"[order.index(options[answer])]
            rows.append([str(i + k * 1_000_000), question, hint or "", *order,
                         *[""] * (4 - len(order)), letter, category, cell, "dev"])
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerows([header, *rows])


def write_scienceqa(folder: Path) -> None:
    lines = []
    for n, (colour, shape, question, hint, choices, answer, subject) in enumerate(SCIENCEQA_ROWS):
        name = f"images/sqa_{n:04d}.png"
        (folder / name).write_bytes(png(draw(colour, shape)))
        lines.append(json.dumps({"image": name, "question": question, "hint": hint,
                                 "choices": choices, "answer": answer, "subject": subject}))
    (folder / "scienceqa.jsonl").write_text("".join(line + "\n" for line in lines))


def main() -> None:
    rng = random.Random(0)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    rng.shuffle(pairs)
    pairs = pairs[:8]
    (HERE / "images").mkdir(exist_ok=True)
    rows, ds_rows, captions = [], [], []
    for n, (color, shape) in enumerate(pairs):
        name = f"images/{n:04d}.png"
        (HERE / name).write_bytes(png(draw(color, shape)))
        rows.append({"image": name, "question": "What colour is the shape?",
                     "choices": list(COLORS), "answer": color})
        ds_rows.append({"img": name, "q": "Which shape is shown?", "opts": list(SHAPES),
                        "ans": SHAPES.index(shape)})
        captions.append({"image": name, "caption": f"a {color} {shape}"})
    (HERE / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (HERE / "shapes_ds.json").write_text("".join(json.dumps(r) + "\n" for r in ds_rows))
    (HERE / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    lines = ["index\timage\tquestion\tA\tB\tC\tD\tanswer"]
    for n, (color, _shape) in enumerate(pairs[:6]):
        b64 = base64.b64encode(png(draw(color, "square"))).decode()
        opts = list(COLORS)
        lines.append(f"{n}\t{b64}\tWhat colour is the square?\t" + "\t".join(opts)
                     + f"\t{'ABCD'[opts.index(color)]}")
    (HERE / "mmbench_mini.tsv").write_text("\n".join(lines) + "\n")
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    lm_rows = []
    for n in range(8):
        i = n % 8
        opts = [words[i + 2], words[(i + 5) % 10], words[(i + 7) % 10]]
        k = n % 3  # rotate so that the right answer is not always first
        lm_rows.append({"context": f"{words[i]} {words[i + 1]}", "choices": opts[k:] + opts[:k],
                        "label": (3 - k) % 3})
    (HERE / "lm_eval").mkdir(exist_ok=True)
    (HERE / "lm_eval" / "next_item.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lm_rows))
    write_mmbench(HERE / "mmbench_dev.tsv")
    write_scienceqa(HERE)


if __name__ == "__main__":
    main()
