"""Speed of the prefix-shared choice scorer against one full forward per choice (not a test).

A LLaVA-shaped model whose prompt is dominated by image tokens (256 + a short question), 4 choices
of 2-4 tokens: the shared scorer runs the image + prompt once and the choices as one cached batch;
the naive reference runs image + prompt + choice four times. Prints seconds per item and the ratio.

    python benchmarks/eval_speed.py [--items 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as tf

from vlmexp.eval.prompt import image_prompt
from vlmexp.eval.scorer import encode_choices, score_continuations, score_continuations_naive
from vlmexp.zoo import tiny
from vlmexp.zoo.tiny_processors import build_tokenizer, random_image

IMAGE = 128  # 128 / 8 = 16 x 16 = 256 image tokens


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, proc = model_and_processor()
    choices = ["a red circle", "a green square", "a blue triangle", "a yellow star"]
    items = [encode_choices(proc, random_image(i, IMAGE), image_prompt(proc, "What is shown?"), choices)
             for i in range(args.items)]
    prefixes, conts = [prefix for prefix, _ in items], items[0][1]
    print(f"prefix {prefixes[0]['input_ids'].shape[1]} tokens, choices {[len(c) for c in conts]} tokens")
    score_continuations(model, prefixes[0], conts)  # warm-up
    score_continuations_naive(model, prefixes[0], conts)
    worst = 0.0
    timings = {}
    for name, fn in (("shared", score_continuations), ("naive", score_continuations_naive)):
        t0 = time.perf_counter()
        results = [fn(model, p, conts) for p in prefixes]
        timings[name] = (time.perf_counter() - t0) / args.items
        timings[name + "_scores"] = results
    for a, b in zip(timings["shared_scores"], timings["naive_scores"], strict=True):
        worst = max(worst, max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True)))
    print(f"shared: {timings['shared'] * 1e3:.1f} ms/item   naive: {timings['naive'] * 1e3:.1f} ms/item")
    print(f"speed-up: {timings['naive'] / timings['shared']:.2f}x at 4 choices   "
          f"(max |score difference| {worst:.2e})")


if __name__ == "__main__":
    main()
