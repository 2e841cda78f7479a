"""Offline stand-ins for real hub checkpoints (tests and the README's worked example only).

A stand-in is a tiny random model of the real checkpoint's architecture with a tokenizer of the
real kind (`vlmexp.zoo.tokenizers`: SentencePiece with byte fallback, byte-level BPE) carrying
the real model's chat template, saved as the hub serves it (bf16, sharded safetensors with an
index, tied embeddings where the real one ties them) and laid out in a Hugging Face hub cache
under the real hub id (`vlmexp.zoo.hub.lay_out_hub_cache`). With `HF_HUB_OFFLINE=1` and
`HF_HOME` pointing there, `llava-hf/llava-1.5-7b-hf` then resolves exactly as the real one
would from a cluster's pre-filled cache.

Example:
    >>> ids = lay_out_family("/tmp/hf/hub", "llava", "/tmp/standins")  # doctest: +SKIP
    >>> ids["base"]  # doctest: +SKIP
    'llava-hf/llava-1.5-7b-hf'
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# the dtype and shard size of the stand-ins: bf16 like the hub's checkpoints, small shards so
# that even a tiny model comes in several files with an index
DTYPE = torch.bfloat16
MAX_SHARD_SIZE = "64KB"


@dataclass(frozen=True)
class Family:
    """One real model family: its tokenizer kind, tiny builder and the hub ids it stands in for."""

    kind: str  # vlmexp.zoo.tokenizers kind
    vlm: str  # vlmexp.zoo.tiny builder
    ids: dict[str, str] = field(default_factory=dict)  # role -> hub id (base, vqa, text)
    tied: bool = False  # the real checkpoint ties its head to the token embeddings
    tie_option: bool = False  # the tiny builder unties by default: ask it to tie


FAMILIES = {
    # LLaVA-1.5 (Llama SentencePiece tokenizer) and a Llama-2-7B fine-tune as the text donor:
    # LLaVA-1.5's language model is Vicuna-7B v1.5, itself a Llama-2-7B fine-tune
    "llava": Family("llama", "llava", {"base": "llava-hf/llava-1.5-7b-hf",
                                       "vqa": "vlmexp-standins/llava-1.5-7b-vqa",
                                       "text": "meta-math/MetaMath-7B-V1.0"}),
    # Qwen2-VL-2B-Instruct (byte-level BPE, tied embeddings) and its base model
    "qwen2_vl": Family("qwen2", "qwen2_vl", {"base": "Qwen/Qwen2-VL-2B-Instruct",
                                             "vqa": "Qwen/Qwen2-VL-2B"}, tied=True,
                       tie_option=True),
    # Gemma 3 4B instruct (Gemma SentencePiece tokenizer, tied embeddings) and its pretrained base
    "gemma3": Family("gemma", "gemma3", {"base": "google/gemma-3-4b-it",
                                         "vqa": "google/gemma-3-4b-pt"}, tied=True),
}


def _text_model_from(vlm: torch.nn.Module, vocab_size: int) -> torch.nn.Module:
    """A text-only Llama holding a copy of a LLaVA's language model and head, with the first
    `vocab_size` rows of its embeddings: llava-hf's LLaVA-1.5 appends `<image>` and `<pad>` to
    Llama-2's 32000 tokens, so its Llama-2 relatives have a smaller vocabulary."""
    import transformers as tf

    config = copy.deepcopy(vlm.config.text_config)
    config.vocab_size = vocab_size
    llm = tf.LlamaForCausalLM(config)
    prefix = "model.language_model."
    state = {"model." + k[len(prefix):]: v for k, v in vlm.state_dict().items()
             if k.startswith(prefix)}
    state["lm_head.weight"] = vlm.state_dict()["lm_head.weight"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:vocab_size].clone()
    llm.load_state_dict(state, strict=True)
    return llm


def build_family(family: str, out: str | os.PathLike) -> dict[str, Path]:
    """Save the family's stand-ins (role → folder) under `out`, bf16 and sharded."""
    from vlmexp.checkpoint import save_model
    from vlmexp.zoo.tiny import build_for_tokenizer, perturb
    from vlmexp.zoo.tiny_processors import for_tokenizer
    from vlmexp.zoo.tokenizers import build_tokenizer

    spec = FAMILIES[family]
    tokenizer = build_tokenizer(spec.kind, chat_template=True)
    processor = for_tokenizer(spec.kind, tokenizer)
    extra = {"tie_word_embeddings": True} if spec.tie_option else {}
    base = build_for_tokenizer(spec.vlm, tokenizer, seed=0, **extra)
    models: dict[str, torch.nn.Module] = {"base": base,
                                          "vqa": perturb(copy.deepcopy(base), 1, 0.05)}
    if "text" in spec.ids:
        from vlmexp.zoo.tokenizers import LLAVA_ADDED

        text = _text_model_from(base, len(tokenizer) - len(LLAVA_ADDED))
        models["text"] = perturb(text, 2, 0.05)
    folders = {}
    for role, model in models.items():
        folder = Path(out) / family / role
        save_model(model.to(DTYPE), folder, processor=processor if role != "text" else tokenizer,
                   force=True, max_shard_size=MAX_SHARD_SIZE)
        if spec.kind == "qwen2" and role != "text":  # the real checkpoints ship it beside
            (folder / "chat_template.json").write_text(
                json.dumps({"chat_template": tokenizer.chat_template}))
        folders[role] = folder
    return folders


def lay_out_family(hub_cache: str | os.PathLike, family: str, out: str | os.PathLike
                   ) -> dict[str, str]:
    """Build the family's stand-ins under `out` and lay them out in the hub cache `hub_cache`
    under the real hub ids; returns role → hub id."""
    from vlmexp.zoo.hub import lay_out_hub_cache

    ids = FAMILIES[family].ids
    for role, folder in build_family(family, out).items():
        lay_out_hub_cache(hub_cache, ids[role], folder)
    return dict(ids)
