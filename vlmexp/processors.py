"""Processors that stand in for a checkpoint's own class where that class cannot be built.

Qwen2-VL / Qwen2.5-VL processors need torchvision (for their video processor) to construct;
`QwenVLImageProcessor` makes the same image inputs from the checkpoint's PIL image processor and
tokenizer: `input_ids` with each `<|image_pad|>` expanded to prod(image_grid_thw) // merge²
copies, `pixel_values`, `image_grid_thw` and `mm_token_type_ids` (1 on image tokens).
`vlmexp.checkpoint.load_processor` is the one place that chooses between the two.

The real classes resize with torchvision (antialiased, on a uint8 tensor), which the PIL image
processors transformers falls back to without torchvision do not reproduce (Qwen2-VL: up to 0.35
apart in normalized pixel values on noisy images; CLIP, Gemma 3, Idefics3: up to 0.03);
`torch_resizing` makes a PIL image processor resize with torch's own antialiased kernels,
exactly as torchvision calls them, so that `pixel_values` match the real classes to 3e-7
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
    from transformers import Qwen2VLImageProcessorPil

    return torch_resizing(Qwen2VLImageProcessorPil(**settings))


def torch_resizing(image_processor: Any) -> Any:
    """`image_processor` (a PIL-backend image processor, which transformers uses where
    torchvision is missing) made to resize as its torchvision twin does, in place; any other
    image processor is returned as it is.

    Example:
        >>> from transformers import CLIPImageProcessorPil
        >>> type(torch_resizing(CLIPImageProcessorPil())).__name__
        'CLIPImageProcessorPilTorchResize'
    """
    from transformers.image_processing_backends import PilBackend

    cls = type(image_processor)
    if isinstance(image_processor, PilBackend) and not cls.__name__.endswith("TorchResize"):
        image_processor.__class__ = _with_torch_resize(cls)
    return image_processor


@cache
def _with_torch_resize(cls: type) -> type:
    """`cls` with `_TorchResize` between it and the PIL backend whose resize it would call."""
    def to_dict(self: Any) -> dict[str, Any]:
        # saved files name the checkpoint's own class, so that they load anywhere as before
        out = cls.to_dict(self)
        out["image_processor_type"] = cls.__name__
        return out

    return type(f"{cls.__name__}TorchResize", (cls, _torch_resize_mixin()), {"to_dict": to_dict})


@cache
def _torch_resize_mixin() -> type:
    import torch
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import PILImageResampling

    modes = {PILImageResampling.BICUBIC: "bicubic", PILImageResampling.BILINEAR: "bilinear",
             PILImageResampling.LANCZOS: "lanczos"}

    class TorchResize(PilBackend):
        """Resizes as torchvision's `resize` does on the CPU: torch's antialiased bicubic,
        bilinear or Lanczos `interpolate` on the image as it is (uint8 goes to torch's native
        kernels, as torchvision sends it on x86 with AVX2 and on ARM)."""

        def resize(self, image: np.ndarray, size: Any, resample: Any = None,
                   **kwargs: Any) -> np.ndarray:
            mode = modes.get(resample)
            if mode is None or image.ndim != 3:
                return super().resize(image, size, resample=resample, **kwargs)
            new_size = _output_size(image, size)
            if tuple(image.shape[-2:]) == new_size:
                return image  # torchvision leaves an image of the right size untouched
            x = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0)
            if x.dtype not in (torch.uint8, torch.float32, torch.float64):
                x = x.to(torch.float32)
            y = torch.nn.functional.interpolate(x, size=new_size, mode=mode,
                                                align_corners=False, antialias=True)
            return y[0].numpy()

    return TorchResize


def _output_size(image: np.ndarray, size: Any) -> tuple[int, int]:
    """The (height, width) the PIL backend's `resize` computes for a channels-first image."""
    from transformers import image_processing_backends as b

    height, width = b.get_image_size(image, channel_dim=b.ChannelDimension.FIRST)
    if size.shortest_edge and size.longest_edge:
        new = b.get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
    elif size.shortest_edge:
        new = b.get_resize_output_image_size(image, size=size.shortest_edge,
                                             default_to_square=False,
                                             input_data_format=b.ChannelDimension.FIRST)
    elif size.max_height and size.max_width:
        new = b.get_image_size_for_max_height_width((height, width), size.max_height,
                                                    size.max_width)
    elif size.height and size.width:
        new = (size.height, size.width)
    else:
        raise ValueError(f"an image size needs height and width, max_height and max_width, or "
                         f"shortest_edge; got {size}")
    return int(new[0]), int(new[1])


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


def without_video(cls: type) -> type:
    """`cls` (a transformers processor class that takes a video processor, which needs
    torchvision) made to build and load without one (pass `video_processor=None` to the
    constructor or to `from_pretrained`): its own code for images and text, so it makes the
    very inputs the class makes, and no videos.

    Example:
        >>> from transformers import SmolVLMProcessor
        >>> without_video(SmolVLMProcessor).get_attributes()
        ['image_processor', 'tokenizer']
    """
    return _without_video(cls)


@cache
def _without_video(cls: type) -> type:
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {
        "__doc__": f"{cls.__name__} without its video processor: build it and load it with "
                   f"video_processor=None.",
        "get_attributes": classmethod(lambda c: list(attributes))})
