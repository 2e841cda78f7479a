"""Processors that stand in for a checkpoint's own class where that class cannot be built.

Qwen2-VL / Qwen2.5-VL processors need torchvision (for their video processor) to construct;
`QwenVLImageProcessor` makes the same image inputs from the checkpoint's PIL image processor and
tokenizer: `input_ids` with each `<|image_pad|>` expanded to prod(image_grid_thw) // merge²
copies, `pixel_values`, `image_grid_thw` and `mm_token_type_ids` (1 on image tokens).
`vlmexp.checkpoint.load_processor` is the one place that chooses between the two.

The real class resizes with torchvision (bicubic, antialiased, on a uint8 tensor), which PIL's
bicubic does not reproduce (up to 0.35 apart in normalized pixel values on noisy images);
`qwen_vl_image_processor` therefore resizes with torch's own antialiased bicubic interpolation,
exactly as torchvision calls it, so that `pixel_values` match the real class
(`benchmarks/processor_check.py` compares them where torchvision is installed).

Example:
    >>> proc = QwenVLImageProcessor(image_processor, tokenizer)  # doctest: +SKIP
    >>> proc(images=[img], text=["<|vision_start|><|image_pad|><|vision_end|>Hi"])  # doctest: +SKIP
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np


def qwen_vl_image_processor(**settings: Any) -> Any:
    """A Qwen2-VL image processor that needs no torchvision and makes the pixel values the
    default (torchvision) `Qwen2VLImageProcessor` makes, from its saved settings."""
    return _torch_resize_class()(**settings)


@cache
def _torch_resize_class() -> type:
    import torch
    from transformers import Qwen2VLImageProcessorPil
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import PILImageResampling

    class TorchResize(PilBackend):
        """Resizes as torchvision's `resize` does on the CPU with bicubic interpolation:
        `interpolate(..., mode="bicubic", antialias=True)` on the image as it is (uint8)."""

        def resize(self, image: np.ndarray, size: Any, resample: Any = None,
                   **kwargs: Any) -> np.ndarray:
            if not (size.height and size.width) or resample != PILImageResampling.BICUBIC:
                return super().resize(image, size, resample=resample, **kwargs)
            x = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0)
            if x.dtype not in (torch.uint8, torch.float32, torch.float64):
                x = x.to(torch.float32)
            # on the CPU torchvision hands uint8 straight to torch's native uint8 kernel
            y = torch.nn.functional.interpolate(x, size=(size.height, size.width),
                                                mode="bicubic", align_corners=False,
                                                antialias=True)
            return y[0].numpy()

    # between the Qwen class (which picks the size) and the PIL backend (which it would call)
    class Qwen2VLImageProcessorTorchResize(Qwen2VLImageProcessorPil, TorchResize):
        pass

    return Qwen2VLImageProcessorTorchResize


class QwenVLImageProcessor:
    """Qwen2-VL / Qwen2.5-VL image + text processor without torchvision (see the module doc)."""

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None
                 ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        # the processor's own template (chat_template.json) wins over the tokenizer's, as in
        # transformers' ProcessorMixin
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = "<|image_pad|>"
        self.vision_start_token = "<|vision_start|>"
        self.vision_end_token = "<|vision_end|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, images: Any = None, text: str | list[str] | None = None,
                 return_tensors: str | None = "pt", **kwargs: Any) -> Any:
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict[str, Any] = {}
        if images is not None:
            data.update(self.image_processor(images=images, return_tensors="pt"))
            merge = self.image_processor.merge_size**2
            counts = iter([int(g.prod()) // merge for g in data["image_grid_thw"]])
            placeholder = "\0"
            out = []
            for t in texts:
                while self.image_token in t:
                    t = t.replace(self.image_token, placeholder * next(counts), 1)
                out.append(t.replace(placeholder, self.image_token))
            texts = out
        enc = self.tokenizer(texts, padding=True, **kwargs)
        ids = np.asarray(enc["input_ids"])
        data.update(enc)
        data["mm_token_type_ids"] = (ids == self.image_token_id).astype(np.int64)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
