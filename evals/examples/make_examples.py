"""Regenerate the small example tasks in this folder (deterministic): `python evals/examples/make_examples.py`.

One example per source kind: JSONL + PNG files, a `datasets` JSON file with its own column names,
an MMBench-style TSV with base64 images, caption retrieval, and a local lm-eval task.
"""

from __future__ import annotations

import base64
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


if __name__ == "__main__":
    main()
