"""Speed and memory of the choice scorer (not a test). Prints ratios from this one run.

1. LLaVA-shaped (`--case llava`): a prompt dominated by image tokens (256 + a short question), 4
   choices of 2-4 tokens. The shared scorer runs image + prompt once per item and the choices as
   one cached batch (`score_continuations`); `score_items` also runs `--batch-size` items' prompts
   per forward; the naive reference runs image + prompt + choice four times.
2. Qwen2-VL-2B-shaped (`--case qwen2b`): a randomly initialised Qwen2-VL with Qwen2-VL-2B's text
   widths (hidden 1536, MLP 8960, 12 heads, 2 KV heads, tied 151,936-token vocabulary) but
   `--layers` of its 28 decoder layers and a small vision tower (both cost the same on either
   path), a `--prefix`-token image prefix, questions of 8-24 tokens and 4 answers of 1-3 tokens.
   Today's path (before the batched scorer: logits at every prefix position over the whole
   vocabulary, one item per forward) against `score_items` (logits at the answer positions only,
   `--batch-size` items per forward): items/s, timed round-robin in this process, and peak
   memory, each path in a subprocess of its own (the peak resident set above what the loaded
   model and encoded items hold, from /proc's VmHWM reset after setup: torch's CPU allocator
   keeps no statistics and tracemalloc does not see it).

    python benchmarks/eval_speed.py [--case all] [--items 10] [--threads 1]
        [--qwen-items 8] [--prefix 600] [--layers 2] [--batch-size 8] [--repeats 2]
        [--prefixes 150 600 1200]

   The sweep (`--prefixes`) measures one item's peak on both paths at several prefix lengths:
   today's grows by prefix × vocabulary (the logits), the batched path's only by activations.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import transformers as tf

from vlmexp.eval.prompt import image_prompt
from vlmexp.eval.scorer import (
    ContinuationScore,
    encode_choices,
    score_continuations,
    score_continuations_naive,
    score_items,
)
from vlmexp.zoo import tiny
from vlmexp.zoo.tiny_processors import build_tokenizer, random_image

IMAGE = 128  # 128 / 8 = 16 x 16 = 256 image tokens

Items = list[tuple[dict[str, torch.Tensor], list[list[int]]]]


# ---- 1. LLaVA-shaped ---------------------------------------------------------------------------

def model_and_processor() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=512,
                           num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE,
                           patch_size=8, projection_dim=128),
        text_config=dict(model_type="llama", vocab_size=tiny.VOCAB, hidden_size=256,
                         intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0),
        image_token_index=tiny.IMAGE_TOKEN, image_seq_length=(IMAGE // 8) ** 2, vision_feature_layer=-1,
    )
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    tok = build_tokenizer({tiny.IMAGE_TOKEN: "<image>"})
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>",
                                     extra_special_tokens={"image_token": "<image>"})
    images = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                      crop_size={"height": IMAGE, "width": IMAGE})
    proc = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             image_token="<image>")
    return model, proc


def worst_difference(a: Sequence[Sequence[ContinuationScore]],
                     b: Sequence[Sequence[ContinuationScore]]) -> float:
    return max(abs(x.logprob - y.logprob) for sa, sb in zip(a, b, strict=True)
               for x, y in zip(sa, sb, strict=True))


def llava_case(args: argparse.Namespace) -> None:
    model, proc = model_and_processor()
    choices = ["a red circle", "a green square", "a blue triangle", "a yellow star"]
    questions = ["What is shown?", "Which shape and colour is in the picture?"]
    items = [encode_choices(proc, random_image(i, IMAGE), image_prompt(proc, questions[i % 2]), choices)
             for i in range(args.items)]
    print(f"1. LLaVA-shaped: prefix {sorted({p['input_ids'].shape[1] for p, _ in items})} tokens, "
          f"choices {[len(c) for c in items[0][1]]} tokens, {args.items} items")
    paths: dict[str, Callable[[Items], list[list[ContinuationScore]]]] = {
        "batched": lambda its: score_items(model, its, batch_size=args.batch_size),
        "shared": lambda its: [score_continuations(model, p, c) for p, c in its],
        "naive": lambda its: [score_continuations_naive(model, p, c) for p, c in its],
    }
    for run in paths.values():  # warm-up
        run(items[:2])
    seconds, scores = round_robin(paths, items, args.repeats)
    for name in paths:
        print(f"   {name:8s} {seconds[name] / args.items * 1e3:8.1f} ms/item")
    print(f"   speed-up: shared {seconds['naive'] / seconds['shared']:.2f}x over naive at 4 choices, "
          f"batched {seconds['shared'] / seconds['batched']:.2f}x over shared   (max |score difference| "
          f"{max(worst_difference(scores['batched'], scores[n]) for n in ('shared', 'naive')):.2e})")


def round_robin(paths: dict[str, Callable[[Items], list[list[ContinuationScore]]]], items: Items,
                repeats: int) -> tuple[dict[str, float], dict[str, list[list[ContinuationScore]]]]:
    """Best seconds of each path over all items, the paths taking turns (the machine's speed
    drifts from minute to minute), and each path's scores."""
    seconds = {name: float("inf") for name in paths}
    scores = {}
    for _ in range(repeats):
        for name, run in paths.items():
            t0 = time.perf_counter()
            scores[name] = run(items)
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
    return seconds, scores


# ---- 2. Qwen2-VL-2B-shaped ---------------------------------------------------------------------

QWEN2VL_2B_LAYERS = 28
VOCAB_2B = 151_936
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151_652, 151_653, 151_655, 151_656
PATCH, MERGE, TEMPORAL = 14, 2, 2


def qwen2b_model(layers: int) -> torch.nn.Module:
    """Qwen2-VL-2B's text widths and vocabulary, `layers` decoder layers, a 1-block vision tower."""
    cfg = tf.Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB_2B, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                          "mrope_section": [16, 24, 24]},
                         bos_token_id=151_643, eos_token_id=151_645, pad_token_id=151_643),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=1536, num_heads=2, mlp_ratio=2,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return tf.Qwen2VLForConditionalGeneration(cfg).eval()


def qwen2b_items(n: int, image_tokens: int) -> Items:
    """Encoded items as Qwen2-VL's processor gives them: a chat prefix, `image_tokens` image pads
    between the vision markers, a question of 8-24 random tokens, then 4 answers of 1-3 tokens."""
    rows = max(d for d in range(1, int(image_tokens ** 0.5) + 1) if image_tokens % d == 0)
    grid = torch.tensor([[1, rows * MERGE, image_tokens // rows * MERGE]])
    g = torch.Generator().manual_seed(0)
    items = []

    def text(k: int) -> torch.Tensor:
        return torch.randint(0, 151_000, (k,), generator=g)

    for i in range(n):
        ids = torch.cat([text(5), torch.tensor([VISION_START]), torch.full((image_tokens,), IMAGE_PAD),
                         torch.tensor([VISION_END]), text(8 + (5 * i) % 17)])[None]
        prefix = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "mm_token_type_ids": (ids == IMAGE_PAD).long(), "image_grid_thw": grid,
                  "pixel_values": torch.randn(int(grid.prod()), 3 * TEMPORAL * PATCH * PATCH, generator=g)}
        items.append((prefix, [text(1 + (i + j) % 3).tolist() for j in range(4)]))
    return items


@torch.no_grad()
def score_full_logits(model: torch.nn.Module, prefix: dict[str, torch.Tensor],
                      continuations: Sequence[Sequence[int]]) -> list[ContinuationScore]:
    """Today's path before the batched scorer: the prefix forward returns logits at every prefix
    position over the whole vocabulary, one item per forward; the choices then run as one batch
    from the prefix's cache (Qwen-VL continuing from the rope deltas it stored)."""
    model.model.rope_deltas = None
    out = model(**prefix, use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    totals = [first[c[0]] for c in continuations]
    width = max(len(c) for c in continuations)
    if width > 1:
        cache = out.cache if "cache" in out else out.past_key_values
        cache.batch_repeat_interleave(len(continuations))
        ids = torch.zeros(len(continuations), width, dtype=torch.long)
        for row, c in enumerate(continuations):
            ids[row, : len(c)] = torch.as_tensor(c)
        logits = model(input_ids=ids[:, :-1], cache=cache, use_cache=True).logits
        rest = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        totals = [t + rest[row, : len(c) - 1].sum()
                  for row, (t, c) in enumerate(zip(totals, continuations, strict=True))]
    return [ContinuationScore(float(t), len(c)) for t, c in zip(totals, continuations, strict=True)]


@torch.no_grad()
def bare_forward(model: torch.nn.Module, prefix: dict[str, torch.Tensor]) -> None:
    """The model's own forward over the prefix with a cache and no logits at all: the floor any
    scorer pays (vision tower, attention, cache), which grows with the prefix."""
    model.model.rope_deltas = None
    model.model(**prefix, use_cache=True)


def qwen2b_paths(model: torch.nn.Module,
                 batch_size: int) -> dict[str, Callable[[Items], list[list[ContinuationScore]]]]:
    return {"today": lambda its: [score_full_logits(model, p, c) for p, c in its],
            "batched": lambda its: score_items(model, its, batch_size=batch_size)}


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def memory_child(args: argparse.Namespace) -> None:
    """One path over the items in this process: prints the peak resident set above the set-up
    (model and encoded items), in MiB, as one JSON line."""
    model = qwen2b_model(args.layers)
    items = qwen2b_items(args.qwen_items, args.prefix)
    paths = {**qwen2b_paths(model, args.batch_size),
             "forward": lambda its: [bare_forward(model, p) for p, _ in its]}
    run = paths[args.memory_child]
    base = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the present one
    t0 = time.perf_counter()
    run(items)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_mib": (resident_kib("VmHWM") - base) / 1024, "seconds": seconds}))


def peak_memory(path: str, args: argparse.Namespace, *, prefix: int | None = None,
                batch_size: int | None = None) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", path, "--threads", str(args.threads),
           "--qwen-items", str(args.qwen_items), "--prefix", str(prefix or args.prefix),
           "--layers", str(args.layers), "--batch-size", str(batch_size or args.batch_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(done.stdout.strip().splitlines()[-1])


def qwen2b_case(args: argparse.Namespace) -> None:
    model = qwen2b_model(args.layers)
    params = sum(p.numel() for p in model.parameters())
    items = qwen2b_items(args.qwen_items, args.prefix)
    lengths = sorted({p["input_ids"].shape[1] for p, _ in items})
    print(f"2. Qwen2-VL-2B-shaped: text widths and vocabulary ({VOCAB_2B:,}) of Qwen2-VL-2B, "
          f"{args.layers} of its {QWEN2VL_2B_LAYERS} decoder layers, a 1-block vision tower "
          f"({params / 1e6:.0f}M parameters, float32); {args.qwen_items} items, {args.prefix} image "
          f"tokens, prefixes of {lengths[0]}-{lengths[-1]} tokens, 4 answers of 1-3 tokens; "
          f"batch size {args.batch_size}")
    full_logits_mib = lengths[-1] * VOCAB_2B * 4 / 2**20
    print(f"   today's prefix logits alone: {full_logits_mib:.0f} MiB per item (float32)")
    paths = qwen2b_paths(model, args.batch_size)
    for run in paths.values():  # warm-up
        run(items[:1])
    seconds, scores = round_robin(paths, items, args.repeats)
    names = list(paths)
    del model, paths  # each path's memory is measured in a process of its own
    memory = {name: peak_memory(name, args) for name in names}
    per_forward = {"today": 1, "batched": min(args.batch_size, args.qwen_items)}
    for name in names:
        peak = memory[name]["peak_mib"]
        print(f"   {name:8s} {args.qwen_items / seconds[name]:7.2f} items/s   peak {peak:7.0f} MiB above "
              f"the loaded model, {peak / per_forward[name]:6.0f} MiB per item of a forward")
    print(f"   batched / today: {seconds['today'] / seconds['batched']:.2f}x items/s, "
          f"{memory['batched']['peak_mib'] / memory['today']['peak_mib']:.2f}x peak memory   "
          f"(max |score difference| {worst_difference(scores['batched'], scores['today']):.2e})")
    if args.prefixes:
        prefix_sweep(args)


def prefix_sweep(args: argparse.Namespace) -> None:
    """Peak memory of one item's forward against the image prefix's length, both paths: what
    grows with prefix × vocabulary (today's logits) and what is left (activations, cache)."""
    print(f"   peak memory of one item against its image prefix ({args.layers} layers, "
          f"batch size 1), MiB above the loaded model; 'forward' is the model's own forward "
          f"with a cache and no logits (vision tower, attention, cache: the floor of any scorer)")
    print(f"   {'prefix':>8} {'forward':>8} {'today':>8} {'batched':>8} "
          f"{'today - forward':>16} {'batched - forward':>18}")
    rows = []
    for prefix in args.prefixes:
        peak = {path: peak_memory(path, args, prefix=prefix, batch_size=1)["peak_mib"]
                for path in ("forward", "today", "batched")}
        rows.append((prefix, peak))
        print(f"   {prefix:>8} {peak['forward']:>8.0f} {peak['today']:>8.0f} "
              f"{peak['batched']:>8.0f} {peak['today'] - peak['forward']:>16.0f} "
              f"{peak['batched'] - peak['forward']:>18.0f}")
    (p0, a), (p1, b) = rows[0], rows[-1]
    for path in ("today", "batched"):
        grow = ((b[path] - b["forward"]) - (a[path] - a["forward"])) / (p1 - p0) * 100
        print(f"   {path}: above the bare forward, {grow:+.1f} MiB per 100 more prefix tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["all", "llava", "qwen2b", "sweep"], default="all",
                    help="sweep: only the 2B-shaped peak-memory sweep over --prefixes")
    ap.add_argument("--items", type=int, default=10, help="LLaVA-shaped items")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--qwen-items", type=int, default=8, help="Qwen2-VL-2B-shaped items")
    ap.add_argument("--prefix", type=int, default=600, help="image tokens of the 2B-shaped prefix")
    ap.add_argument("--layers", type=int, default=2, help=f"decoder layers (2B: {QWEN2VL_2B_LAYERS})")
    ap.add_argument("--batch-size", type=int, default=8, help="items per forward of score_items")
    ap.add_argument("--prefixes", type=int, nargs="*", default=[150, 600, 1200],
                    help="image prefixes of the peak-memory sweep (none: no sweep)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds (best of)")
    ap.add_argument("--memory-child", choices=["today", "batched", "forward"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    if args.case in ("all", "llava"):
        llava_case(args)
    if args.case in ("all", "qwen2b"):
        qwen2b_case(args)
    if args.case == "sweep":
        prefix_sweep(args)


if __name__ == "__main__":
    main()
