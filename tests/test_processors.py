"""The Qwen-VL image-only processor: chosen by the one processor loader for either layout a
checkpoint stores its processor in, with the checkpoint's chat template, resizing as the real
(torchvision) class does. Its equality with the real class is checked where torchvision is
installed, by benchmarks/processor_check.py (see the README)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmexp.checkpoint import load_processor
from vlmexp.processors import QwenVLImageProcessor, qwen_vl_image_processor, torch_resizing
from vlmexp.zoo.tokenizers import qwen2_tokenizer

# the real Qwen2-VL-2B-Instruct preprocessor settings
SETTINGS = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136,
                max_pixels=12845056, image_mean=[0.48145466, 0.4578275, 0.40821073],
                image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% endfor %}<|im_start|>assistant\n"


def _noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer():
    return qwen2_tokenizer(chat_template=True)


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_the_loader_builds_the_image_only_processor_from_either_layout(layout, tokenizer,
                                                                      tmp_path):
    tokenizer.save_pretrained(tmp_path)
    settings = {**SETTINGS, "image_processor_type": "Qwen2VLImageProcessor"}
    if layout == "hub":  # preprocessor_config.json and chat_template.json
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
        (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    else:  # processor_config.json with the image processor nested, chat_template.jinja
        (tmp_path / "processor_config.json").write_text(json.dumps(
            {"image_processor": settings, "processor_class": "Qwen2VLProcessor"}))
        (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    processor = load_processor(tmp_path)
    assert isinstance(processor, QwenVLImageProcessor)
    assert processor.chat_template == TEMPLATE != tokenizer.chat_template  # the processor's own
    assert processor.image_processor.patch_size == 14
    assert processor.image_processor.size["longest_edge"] == 12845056
    out = processor(images=[_noise(500, 333)], text=["<|vision_start|><|image_pad|><|vision_end|>"],
                    return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 24, 36]]  # smart_resize to 336 x 504
    pads = int((out["input_ids"] == processor.image_token_id).sum())
    assert pads == 24 * 36 // 4 == int(out["mm_token_type_ids"].sum())
    assert out["pixel_values"].shape == (24 * 36, 3 * 2 * 14 * 14)


def test_resizing_is_torchs_antialiased_bicubic_on_the_uint8_image():
    from transformers import Qwen2VLImageProcessorPil

    image = _noise(500, 333)
    ours = qwen_vl_image_processor(**SETTINGS)(images=[image], return_tensors="pt")
    pil = Qwen2VLImageProcessorPil(**SETTINGS)(images=[image], return_tensors="pt")
    # the reference: torch's kernel on the uint8 image, then rescale, normalize and patchify
    # as the PIL class does (a resize-free image goes through it unchanged)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(x, size=(336, 504), mode="bicubic",
                                              align_corners=False, antialias=True)[0]
    ref = Qwen2VLImageProcessorPil(**SETTINGS)(
        images=[Image.fromarray(resized.permute(1, 2, 0).numpy())], return_tensors="pt")
    assert torch.allclose(ours["pixel_values"], ref["pixel_values"], atol=1e-6)
    assert (ours["pixel_values"] - pil["pixel_values"]).abs().max() > 1e-3  # PIL's bicubic differs


def test_torch_resizing_follows_the_pil_backends_size_rules():
    from transformers import CLIPImageProcessorPil

    settings = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                    resample=3, do_center_crop=True)
    image = _noise(640, 480)
    ours = torch_resizing(CLIPImageProcessorPil(**settings))
    assert type(ours).__name__ == "CLIPImageProcessorPilTorchResize"
    got = ours(images=[image], return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(x, size=(336, 448), mode="bicubic",
                                              align_corners=False, antialias=True)[0]
    ref = CLIPImageProcessorPil(**settings)(
        images=[Image.fromarray(resized.permute(1, 2, 0).numpy())], return_tensors="pt")
    assert torch.allclose(got, ref["pixel_values"], atol=1e-6)
    assert torch_resizing(ours) is ours and type(ours).__name__.count("TorchResize") == 1


def test_the_loader_resizes_as_torchvision_where_it_is_missing(tmp_path, tiny_processor):
    from transformers.utils import is_torchvision_available

    assert not is_torchvision_available()  # this suite's environment (see setup.sh)
    tiny_processor("llava").save_pretrained(tmp_path)
    processor = load_processor(tmp_path)
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__.endswith("PilTorchResize")
    processor.save_pretrained(tmp_path / "again")  # saved under the checkpoint's own class
    saved = json.loads((tmp_path / "again" / "processor_config.json").read_text())
    assert saved["image_processor"]["image_processor_type"] == "CLIPImageProcessorPil"


def test_a_processor_class_that_needs_torchvision_for_videos_loads_without_them(tmp_path,
                                                                                tiny_processor):
    """SmolVLM's processor class takes a video processor, which needs torchvision: the loader
    builds the class itself without one, so images and text go through the class's own code."""
    from transformers import SmolVLMImageProcessorPil, SmolVLMProcessor

    from vlmexp.processors import without_video

    tokenizer = tiny_processor("idefics3").tokenizer
    settings = dict(max_image_size={"longest_edge": 32}, size={"longest_edge": 64})
    made = without_video(SmolVLMProcessor)(
        image_processor=SmolVLMImageProcessorPil(**settings), tokenizer=tokenizer,
        video_processor=None, image_seq_len=4, chat_template=TEMPLATE)
    made.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "SmolVLMProcessor"  # loads as the real class elsewhere
    saved["image_seq_len"] = 4  # as the hub's SmolVLM files hold it (save_pretrained drops it)
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    processor = load_processor(tmp_path)
    assert isinstance(processor, SmolVLMProcessor) and getattr(processor, "video_processor", None) is None
    assert processor.chat_template == TEMPLATE
    assert type(processor.image_processor).__name__.endswith("PilTorchResize")
    image = _noise(70, 50)
    ours = processor(images=[image], text=["<image>What is it?"], return_tensors="pt")
    ref = made(images=[image], text=["<image>What is it?"], return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert int((ours["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum()) > 4
