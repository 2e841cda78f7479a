"""Check the image-only Qwen-VL processor against the real processor classes (needs torchvision).

Qwen2-VL / Qwen2.5-VL processors need torchvision to construct; without it vlmexp's processor
loader (`checkpoint.load_processor`) uses `vlmexp.processors.QwenVLImageProcessor` around the
checkpoint's PIL image processor and tokenizer. This script saves a checkpoint's processor files
with the real class (the real checkpoints' preprocessor settings, a byte-level BPE tokenizer of
Qwen2's kind with Qwen2-VL's chat template), loads them back both ways, and compares what each
makes for the same images and prompts: the prompt text, `input_ids`, `image_grid_thw`,
`mm_token_type_ids` and `pixel_values`.

Run it where torchvision imports (a GPU machine, or on a CPU: a venv with the registry's CUDA
build of torch and its torchvision, which install and run on a CPU):

    python3 -m venv /tmp/tv
    /tmp/tv/bin/pip install --isolated torch==2.13.0 torchvision==0.28.0 transformers==5.24.0 pillow
    PYTHONPATH=. /tmp/tv/bin/python benchmarks/processor_check.py

It exits 1 if any tensor differs beyond the tolerance it prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

# the real checkpoints' preprocessor_config.json (Qwen2-VL-2B-Instruct; Qwen2.5-VL reuses it)
QWEN_VL_PREPROCESSOR = dict(
    patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)
SIZES = ((32, 32), (224, 224), (500, 333), (640, 480), (1024, 768))
TOLERANCE = [1e-5]  # set from --tolerance
QUESTIONS = ("What colour is the shape?", "Which option is right?\nA. red\nB. blue")


def _image(size: tuple[int, int], seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def check(arch: str) -> bool:
    import transformers as tf

    from vlmexp.zoo.tokenizers import qwen2_tokenizer

    tokenizer = qwen2_tokenizer(chat_template=True)
    cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor}[arch]
    real = cls(image_processor=tf.Qwen2VLImageProcessor(**QWEN_VL_PREPROCESSOR),
               tokenizer=tokenizer, video_processor=tf.Qwen2VLVideoProcessor(),
               chat_template=tokenizer.chat_template)
    ok = True
    for layout in ("transformers 5", "hub"):
        with tempfile.TemporaryDirectory() as tmp:
            if layout == "hub":  # as the hub serves Qwen2-VL-2B-Instruct
                real.image_processor.save_pretrained(tmp)  # preprocessor_config.json
                tokenizer.save_pretrained(tmp)
                (Path(tmp) / "chat_template.json").write_text(
                    json.dumps({"chat_template": tokenizer.chat_template}))
            else:  # processor_config.json with the image processor nested, chat_template.jinja
                real.save_pretrained(tmp)
            ok &= _compare(arch, layout, Path(tmp))
    return ok


def _compare(arch: str, layout: str, folder: Path) -> bool:
    import torch
    import transformers as tf

    from vlmexp.checkpoint import _image_only_processor
    from vlmexp.eval.prompt import image_prompt

    loaded_real = tf.AutoProcessor.from_pretrained(folder)  # what a user with torchvision gets
    ours = _image_only_processor(folder, tf.AutoTokenizer.from_pretrained(folder))
    if ours is None:
        print(f"{arch} ({layout} layout): no image-only processor was made   <-- FAIL")
        return False
    print(f"{arch} ({layout} layout): real {type(loaded_real).__name__} "
          f"({type(loaded_real.image_processor).__name__}) vs "
          f"{type(ours).__name__} ({type(ours.image_processor).__name__})")
    ok = True
    for n, size in enumerate(SIZES):
        for question in QUESTIONS:
            image = _image(size, n)
            prompts = [image_prompt(p, question) for p in (loaded_real, ours)]
            a = loaded_real(images=[image], text=[prompts[0]], return_tensors="pt")
            b = ours(images=[image], text=[prompts[1]], return_tensors="pt")
            same = {k: torch.equal(a[k], b[k]) for k in
                    ("input_ids", "image_grid_thw", "mm_token_type_ids")}
            diff = float((a["pixel_values"].float() - b["pixel_values"].float()).abs().max())
            good = prompts[0] == prompts[1] and all(same.values()) and diff <= TOLERANCE[0]
            ok &= good
            print(f"  {size[0]}x{size[1]} {question[:20]!r}: prompt "
                  f"{'same' if prompts[0] == prompts[1] else 'DIFFERS'}, "
                  + ", ".join(f"{k} {'same' if v else 'DIFFERS'}" for k, v in same.items())
                  + f", {a['input_ids'].shape[1]} tokens, grid {a['image_grid_thw'].tolist()}, "
                  f"pixel_values max |diff| {diff:.2e}" + ("" if good else "   <-- FAIL"))
    return ok


# the real checkpoints' image processor settings: llava-hf/llava-1.5-7b-hf (CLIP),
# google/gemma-3-4b-it, HuggingFaceTB/SmolVLM-Instruct (Idefics3)
IMAGE_PROCESSORS = {
    "llava-1.5 (CLIP)": ("CLIPImageProcessor", dict(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
        do_center_crop=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])),
    "gemma-3": ("Gemma3ImageProcessor", dict(
        size={"height": 896, "width": 896}, resample=2, image_mean=[0.5] * 3,
        image_std=[0.5] * 3)),
    "smolvlm (Idefics3)": ("Idefics3ImageProcessor", dict(
        size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}, resample=1,
        do_image_splitting=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)),
}


def check_image_processor(name: str) -> bool:
    """The default (torchvision) image processor against the PIL one that transformers uses
    without torchvision, as `checkpoint.load_processor` adjusts it (`torch_resizing`)."""
    import transformers as tf

    from vlmexp.processors import torch_resizing

    cls, settings = IMAGE_PROCESSORS[name]
    real = getattr(tf, cls)(**settings)
    pil = torch_resizing(getattr(tf, f"{cls}Pil")(**settings))
    plain = getattr(tf, f"{cls}Pil")(**settings)
    ok = True
    print(f"{name}: {type(real).__name__} vs {type(pil).__name__}")
    for n, size in enumerate(SIZES):
        image = _image(size, n)
        a, b, c = (p(images=[image], return_tensors="pt")["pixel_values"] for p in (real, pil, plain))
        shapes = a.shape == b.shape
        diff = float((a.float() - b.float()).abs().max()) if shapes else float("inf")
        before = float((a.float() - c.float()).abs().max()) if a.shape == c.shape else float("inf")
        good = diff <= TOLERANCE[0]
        ok &= good
        print(f"  {size[0]}x{size[1]}: shape {tuple(a.shape)}{'' if shapes else ' DIFFERS'}, "
              f"pixel_values max |diff| {diff:.2e} (PIL resizing: {before:.2e})"
              + ("" if good else "   <-- FAIL"))
    return ok


def check_smolvlm() -> bool:
    """SmolVLM's real processor (its video processor needs torchvision) against the class
    without its video processor, with the PIL image processor as the loader adjusts it."""
    import torch
    import transformers as tf

    from vlmexp.processors import torch_resizing, without_video
    from vlmexp.zoo.tiny_processors import build_processor

    tokenizer = build_processor("idefics3").tokenizer  # has <image>, <fake_token_around_image>
    settings = dict(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384},
                    resample=1, do_image_splitting=True, image_mean=[0.5] * 3,
                    image_std=[0.5] * 3)
    real = tf.SmolVLMProcessor(image_processor=tf.SmolVLMImageProcessor(**settings),
                               tokenizer=tokenizer, video_processor=tf.SmolVLMVideoProcessor(),
                               image_seq_len=64)
    ours = without_video(tf.SmolVLMProcessor)(
        image_processor=torch_resizing(tf.SmolVLMImageProcessorPil(**settings)),
        tokenizer=tokenizer, video_processor=None, image_seq_len=64)
    print(f"smolvlm: real {type(real).__name__} ({type(real.image_processor).__name__}) vs "
          f"{type(ours).__name__} without video ({type(ours.image_processor).__name__})")
    ok = True
    for n, size in enumerate(SIZES):
        image = _image(size, n)
        a = real(images=[image], text=["<image>What is shown?"], return_tensors="pt")
        b = ours(images=[image], text=["<image>What is shown?"], return_tensors="pt")
        same = torch.equal(a["input_ids"], b["input_ids"])
        diff = (float((a["pixel_values"] - b["pixel_values"]).abs().max())
                if a["pixel_values"].shape == b["pixel_values"].shape else float("inf"))
        good = same and diff <= TOLERANCE[0]
        ok &= good
        print(f"  {size[0]}x{size[1]}: input_ids {'same' if same else 'DIFFER'} "
              f"({a['input_ids'].shape[1]} tokens), pixel_values {tuple(a['pixel_values'].shape)} "
              f"max |diff| {diff:.2e}" + ("" if good else "   <-- FAIL"))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest pixel_values difference accepted (default 1e-5)")
    args = parser.parse_args(argv)
    try:
        import torchvision
    except ImportError:
        print("processor_check: torchvision does not import here; see the module docstring",
              file=sys.stderr)
        return 2
    import torch
    import transformers

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"transformers {transformers.__version__}")
    TOLERANCE[0] = args.tolerance
    results = [check(arch) for arch in ("qwen2_vl", "qwen2_5_vl")]
    results += [check_image_processor(name) for name in IMAGE_PROCESSORS]
    results.append(check_smolvlm())
    print("all equal" if all(results) else "DIFFERENCES FOUND")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
