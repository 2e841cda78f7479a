"""Tiny random instances of every supported architecture, built offline from config classes.

They serve the tests (layout, checkpoint I/O, evaluation) and the benchmarks. Each builder is a
plain function over literals; `build(name)` looks one up by its short name.

Example:
    >>> from vlmexp.zoo.tiny import build
    >>> model = build("llava")
    >>> type(model).__name__
    'LlavaForConditionalGeneration'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tf

VOCAB = 320  # special tokens for images live at the top of the vocabulary
IMAGE_TOKEN = 300
BOI_TOKEN = 301
EOI_TOKEN = 302
VISION_START = 303
VISION_END = 304
VIDEO_TOKEN = 305


def _llama_text(vocab_size: int = VOCAB, **kw) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, **kw,
    )


def _clip_vision(**kw) -> dict:
    return dict(
        model_type="clip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=24, **kw,
    )


def llava(*, vocab_size: int = VOCAB, image_token: int = IMAGE_TOKEN) -> torch.nn.Module:
    cfg = tf.LlavaConfig(
        vision_config=_clip_vision(),
        text_config={"model_type": "llama", **_llama_text(vocab_size=vocab_size)},
        image_token_index=image_token, image_seq_length=16, vision_feature_layer=-1,
    )
    return tf.LlavaForConditionalGeneration(cfg)


def llava_next() -> torch.nn.Module:
    cfg = tf.LlavaNextConfig(
        vision_config=_clip_vision(), text_config={"model_type": "llama", **_llama_text()},
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
        vision_feature_layer=-1,
    )
    return tf.LlavaNextForConditionalGeneration(cfg)


def _qwen_text(vocab_size: int = VOCAB, **kw) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw,
    )


def qwen2_vl(*, vocab_size: int = VOCAB, image_token: int = IMAGE_TOKEN,
             video_token: int = VIDEO_TOKEN, vision_start: int = VISION_START,
             vision_end: int = VISION_END, tie_word_embeddings: bool = False) -> torch.nn.Module:
    """A tiny Qwen2-VL; `tie_word_embeddings=True` shares the head with the token embeddings
    (as the small real Qwen2-VL / Qwen2.5-VL checkpoints do)."""
    tie = {"tie_word_embeddings": True} if tie_word_embeddings else {}
    cfg = tf.Qwen2VLConfig(
        text_config=_qwen_text(vocab_size, **tie),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=image_token, video_token_id=video_token,
        vision_start_token_id=vision_start, vision_end_token_id=vision_end, **tie,
    )
    return tf.Qwen2VLForConditionalGeneration(cfg)


def qwen2_5_vl() -> torch.nn.Module:
    cfg = tf.Qwen2_5_VLConfig(
        text_config=_qwen_text(),
        vision_config=dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32,
                           num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=32, fullatt_block_indexes=[1]),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    return tf.Qwen2_5_VLForConditionalGeneration(cfg)


def idefics3() -> torch.nn.Module:
    cfg = tf.Idefics3Config(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config={"model_type": "llama", **_llama_text()},
        image_token_id=IMAGE_TOKEN, scale_factor=2,
    )
    return tf.Idefics3ForConditionalGeneration(cfg)


def paligemma() -> torch.nn.Module:
    cfg = tf.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32,
                           patch_size=8, projection_dim=32),
        text_config=dict(model_type="gemma", vocab_size=VOCAB, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8, pad_token_id=0),
        image_token_index=IMAGE_TOKEN, vocab_size=VOCAB, projection_dim=32, hidden_size=32,
    )
    return tf.PaliGemmaForConditionalGeneration(cfg)


def _gemma3_text(vocab_size: int = VOCAB, **kw) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=16,
        max_position_embeddings=256, pad_token_id=0, **kw,
    )


def gemma3(*, vocab_size: int = VOCAB, image_token: int = IMAGE_TOKEN, boi_token: int = BOI_TOKEN,
           eoi_token: int = EOI_TOKEN) -> torch.nn.Module:
    cfg = tf.Gemma3Config(
        text_config=_gemma3_text(vocab_size),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=boi_token, eoi_token_index=eoi_token,
        image_token_index=image_token,
    )
    return tf.Gemma3ForConditionalGeneration(cfg)


def llama() -> torch.nn.Module:
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_text()))


def qwen2() -> torch.nn.Module:
    kw = _qwen_text()
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**kw))


def gemma3_text() -> torch.nn.Module:
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_gemma3_text()))


BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "llava": llava,
    "llava_next": llava_next,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "idefics3": idefics3,
    "paligemma": paligemma,
    "gemma3": gemma3,
    "llama": llama,
    "qwen2": qwen2,
    "gemma3_text": gemma3_text,
}
VLMS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "gemma3")
LLMS = ("llama", "qwen2", "gemma3_text")


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """Build the tiny random model `name` (one of BUILDERS), deterministically for `seed`."""
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny architecture {name!r}; known: {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


# The special tokens each VLM's config names, by builder keyword (for `build_for_tokenizer`).
TOKEN_KEYWORDS: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "qwen2_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"},
    "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
               "eoi_token": "<end_of_image>"},
}


def build_for_tokenizer(name: str, tokenizer: Any, seed: int = 0, **config: Any) -> torch.nn.Module:
    """The tiny VLM `name` sized to `tokenizer`: its vocabulary and its image tokens' ids.

    Example:
        >>> from vlmexp.zoo.tokenizers import qwen2_tokenizer
        >>> tok = qwen2_tokenizer()
        >>> build_for_tokenizer("qwen2_vl", tok).config.image_token_id == tok.image_token_id
        True
    """
    if name not in TOKEN_KEYWORDS:
        raise KeyError(f"no tokenizer-sized builder for {name!r}; known: {', '.join(TOKEN_KEYWORDS)}")
    ids = {kw: tokenizer.convert_tokens_to_ids(token) for kw, token in TOKEN_KEYWORDS[name].items()}
    torch.manual_seed(seed)
    return BUILDERS[name](vocab_size=len(tokenizer), **ids, **config).eval()


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Add seeded Gaussian noise of std `scale` to every parameter, in place (a stand-in for
    fine-tuning in tests and benchmarks); returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=scale)
    return model


def llava_family() -> dict[str, torch.nn.Module]:
    """A tiny LLaVA `base`, a fine-tuned relative (`vqa`) and a Llama `text` expert that starts
    from the base's language model and head, then drifts: the engine's tests and GPU check."""
    base = build("llava", seed=0)
    vqa = perturb(build("llava", seed=0), 1)
    llm = build("llama", seed=0)
    prefix = "model.language_model."
    state = {"model." + k[len(prefix):]: v
             for k, v in base.state_dict().items() if k.startswith(prefix)}
    state["lm_head.weight"] = base.state_dict()["lm_head.weight"]
    llm.load_state_dict(state)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in llm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.03)
    return {"base": base, "vqa": vqa, "text": llm}
