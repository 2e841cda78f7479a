"""Tests for vlmexp.layout.discover: the exact placement of every parameter of the tiny zoo."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vlmexp.errors import LayoutError
from vlmexp.layout import COMPONENTS, Layout, ParamInfo, discover
from vlmexp.zoo.tiny import BUILDERS

# Expected placement, one line per canonical parameter: "name component [block]".
# Generated once from discover(), then reviewed by hand against each model's structure:
# vision towers (embeddings, blocks, post-norms, SigLIP's pooling head) → vision; LLaVA's
# multi_modal_projector, LLaVA-NeXT's image_newline (a text-space vector), Qwen-VL's
# visual.merger (its mlp.0/mlp.2 are Sequential indices, not blocks), Idefics3's connector,
# Gemma 3's bare mm_input_projection_weight + mm_soft_emb_norm → projector; embed_tokens →
# embed; decoder layers and the final norm → language; lm_head → head, except where tied
# (PaliGemma, Gemma 3, Gemma 3 text), where it is folded into embed and has no line.
EXPECTED: dict[str, str] = {
    "llava": """
        model.vision_tower.embeddings.class_embedding vision
        model.vision_tower.embeddings.patch_embedding.weight vision
        model.vision_tower.embeddings.position_embedding.weight vision
        model.vision_tower.pre_layrnorm.weight vision
        model.vision_tower.pre_layrnorm.bias vision
        model.vision_tower.encoder.layers.0.self_attn.k_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.k_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.v_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.v_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.q_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.q_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.out_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.out_proj.bias vision 0
        model.vision_tower.encoder.layers.0.layer_norm1.weight vision 0
        model.vision_tower.encoder.layers.0.layer_norm1.bias vision 0
        model.vision_tower.encoder.layers.0.mlp.fc1.weight vision 0
        model.vision_tower.encoder.layers.0.mlp.fc1.bias vision 0
        model.vision_tower.encoder.layers.0.mlp.fc2.weight vision 0
        model.vision_tower.encoder.layers.0.mlp.fc2.bias vision 0
        model.vision_tower.encoder.layers.0.layer_norm2.weight vision 0
        model.vision_tower.encoder.layers.0.layer_norm2.bias vision 0
        model.vision_tower.encoder.layers.1.self_attn.k_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.k_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.v_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.v_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.q_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.q_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.out_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.out_proj.bias vision 1
        model.vision_tower.encoder.layers.1.layer_norm1.weight vision 1
        model.vision_tower.encoder.layers.1.layer_norm1.bias vision 1
        model.vision_tower.encoder.layers.1.mlp.fc1.weight vision 1
        model.vision_tower.encoder.layers.1.mlp.fc1.bias vision 1
        model.vision_tower.encoder.layers.1.mlp.fc2.weight vision 1
        model.vision_tower.encoder.layers.1.mlp.fc2.bias vision 1
        model.vision_tower.encoder.layers.1.layer_norm2.weight vision 1
        model.vision_tower.encoder.layers.1.layer_norm2.bias vision 1
        model.vision_tower.post_layernorm.weight vision
        model.vision_tower.post_layernorm.bias vision
        model.multi_modal_projector.linear_1.weight projector
        model.multi_modal_projector.linear_1.bias projector
        model.multi_modal_projector.linear_2.weight projector
        model.multi_modal_projector.linear_2.bias projector
        model.language_model.embed_tokens.weight embed
        model.language_model.layers.0.self_attn.q_proj.weight language 0
        model.language_model.layers.0.self_attn.k_proj.weight language 0
        model.language_model.layers.0.self_attn.v_proj.weight language 0
        model.language_model.layers.0.self_attn.o_proj.weight language 0
        model.language_model.layers.0.mlp.gate_proj.weight language 0
        model.language_model.layers.0.mlp.up_proj.weight language 0
        model.language_model.layers.0.mlp.down_proj.weight language 0
        model.language_model.layers.0.input_layernorm.weight language 0
        model.language_model.layers.0.post_attention_layernorm.weight language 0
        model.language_model.layers.1.self_attn.q_proj.weight language 1
        model.language_model.layers.1.self_attn.k_proj.weight language 1
        model.language_model.layers.1.self_attn.v_proj.weight language 1
        model.language_model.layers.1.self_attn.o_proj.weight language 1
        model.language_model.layers.1.mlp.gate_proj.weight language 1
        model.language_model.layers.1.mlp.up_proj.weight language 1
        model.language_model.layers.1.mlp.down_proj.weight language 1
        model.language_model.layers.1.input_layernorm.weight language 1
        model.language_model.layers.1.post_attention_layernorm.weight language 1
        model.language_model.norm.weight language
        lm_head.weight head
    """,
    "llava_next": """
        model.image_newline projector
        model.vision_tower.embeddings.class_embedding vision
        model.vision_tower.embeddings.patch_embedding.weight vision
        model.vision_tower.embeddings.position_embedding.weight vision
        model.vision_tower.pre_layrnorm.weight vision
        model.vision_tower.pre_layrnorm.bias vision
        model.vision_tower.encoder.layers.0.self_attn.k_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.k_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.v_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.v_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.q_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.q_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.out_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.out_proj.bias vision 0
        model.vision_tower.encoder.layers.0.layer_norm1.weight vision 0
        model.vision_tower.encoder.layers.0.layer_norm1.bias vision 0
        model.vision_tower.encoder.layers.0.mlp.fc1.weight vision 0
        model.vision_tower.encoder.layers.0.mlp.fc1.bias vision 0
        model.vision_tower.encoder.layers.0.mlp.fc2.weight vision 0
        model.vision_tower.encoder.layers.0.mlp.fc2.bias vision 0
        model.vision_tower.encoder.layers.0.layer_norm2.weight vision 0
        model.vision_tower.encoder.layers.0.layer_norm2.bias vision 0
        model.vision_tower.encoder.layers.1.self_attn.k_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.k_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.v_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.v_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.q_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.q_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.out_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.out_proj.bias vision 1
        model.vision_tower.encoder.layers.1.layer_norm1.weight vision 1
        model.vision_tower.encoder.layers.1.layer_norm1.bias vision 1
        model.vision_tower.encoder.layers.1.mlp.fc1.weight vision 1
        model.vision_tower.encoder.layers.1.mlp.fc1.bias vision 1
        model.vision_tower.encoder.layers.1.mlp.fc2.weight vision 1
        model.vision_tower.encoder.layers.1.mlp.fc2.bias vision 1
        model.vision_tower.encoder.layers.1.layer_norm2.weight vision 1
        model.vision_tower.encoder.layers.1.layer_norm2.bias vision 1
        model.vision_tower.post_layernorm.weight vision
        model.vision_tower.post_layernorm.bias vision
        model.multi_modal_projector.linear_1.weight projector
        model.multi_modal_projector.linear_1.bias projector
        model.multi_modal_projector.linear_2.weight projector
        model.multi_modal_projector.linear_2.bias projector
        model.language_model.embed_tokens.weight embed
        model.language_model.layers.0.self_attn.q_proj.weight language 0
        model.language_model.layers.0.self_attn.k_proj.weight language 0
        model.language_model.layers.0.self_attn.v_proj.weight language 0
        model.language_model.layers.0.self_attn.o_proj.weight language 0
        model.language_model.layers.0.mlp.gate_proj.weight language 0
        model.language_model.layers.0.mlp.up_proj.weight language 0
        model.language_model.layers.0.mlp.down_proj.weight language 0
        model.language_model.layers.0.input_layernorm.weight language 0
        model.language_model.layers.0.post_attention_layernorm.weight language 0
        model.language_model.layers.1.self_attn.q_proj.weight language 1
        model.language_model.layers.1.self_attn.k_proj.weight language 1
        model.language_model.layers.1.self_attn.v_proj.weight language 1
        model.language_model.layers.1.self_attn.o_proj.weight language 1
        model.language_model.layers.1.mlp.gate_proj.weight language 1
        model.language_model.layers.1.mlp.up_proj.weight language 1
        model.language_model.layers.1.mlp.down_proj.weight language 1
        model.language_model.layers.1.input_layernorm.weight language 1
        model.language_model.layers.1.post_attention_layernorm.weight language 1
        model.language_model.norm.weight language
        lm_head.weight head
    """,
    "qwen2_vl": """
        model.visual.patch_embed.proj.weight vision
        model.visual.blocks.0.norm1.weight vision 0
        model.visual.blocks.0.norm1.bias vision 0
        model.visual.blocks.0.norm2.weight vision 0
        model.visual.blocks.0.norm2.bias vision 0
        model.visual.blocks.0.attn.qkv.weight vision 0
        model.visual.blocks.0.attn.qkv.bias vision 0
        model.visual.blocks.0.attn.proj.weight vision 0
        model.visual.blocks.0.attn.proj.bias vision 0
        model.visual.blocks.0.mlp.fc1.weight vision 0
        model.visual.blocks.0.mlp.fc1.bias vision 0
        model.visual.blocks.0.mlp.fc2.weight vision 0
        model.visual.blocks.0.mlp.fc2.bias vision 0
        model.visual.blocks.1.norm1.weight vision 1
        model.visual.blocks.1.norm1.bias vision 1
        model.visual.blocks.1.norm2.weight vision 1
        model.visual.blocks.1.norm2.bias vision 1
        model.visual.blocks.1.attn.qkv.weight vision 1
        model.visual.blocks.1.attn.qkv.bias vision 1
        model.visual.blocks.1.attn.proj.weight vision 1
        model.visual.blocks.1.attn.proj.bias vision 1
        model.visual.blocks.1.mlp.fc1.weight vision 1
        model.visual.blocks.1.mlp.fc1.bias vision 1
        model.visual.blocks.1.mlp.fc2.weight vision 1
        model.visual.blocks.1.mlp.fc2.bias vision 1
        model.visual.merger.ln_q.weight projector
        model.visual.merger.ln_q.bias projector
        model.visual.merger.mlp.0.weight projector
        model.visual.merger.mlp.0.bias projector
        model.visual.merger.mlp.2.weight projector
        model.visual.merger.mlp.2.bias projector
        model.language_model.embed_tokens.weight embed
        model.language_model.layers.0.self_attn.q_proj.weight language 0
        model.language_model.layers.0.self_attn.q_proj.bias language 0
        model.language_model.layers.0.self_attn.k_proj.weight language 0
        model.language_model.layers.0.self_attn.k_proj.bias language 0
        model.language_model.layers.0.self_attn.v_proj.weight language 0
        model.language_model.layers.0.self_attn.v_proj.bias language 0
        model.language_model.layers.0.self_attn.o_proj.weight language 0
        model.language_model.layers.0.mlp.gate_proj.weight language 0
        model.language_model.layers.0.mlp.up_proj.weight language 0
        model.language_model.layers.0.mlp.down_proj.weight language 0
        model.language_model.layers.0.input_layernorm.weight language 0
        model.language_model.layers.0.post_attention_layernorm.weight language 0
        model.language_model.layers.1.self_attn.q_proj.weight language 1
        model.language_model.layers.1.self_attn.q_proj.bias language 1
        model.language_model.layers.1.self_attn.k_proj.weight language 1
        model.language_model.layers.1.self_attn.k_proj.bias language 1
        model.language_model.layers.1.self_attn.v_proj.weight language 1
        model.language_model.layers.1.self_attn.v_proj.bias language 1
        model.language_model.layers.1.self_attn.o_proj.weight language 1
        model.language_model.layers.1.mlp.gate_proj.weight language 1
        model.language_model.layers.1.mlp.up_proj.weight language 1
        model.language_model.layers.1.mlp.down_proj.weight language 1
        model.language_model.layers.1.input_layernorm.weight language 1
        model.language_model.layers.1.post_attention_layernorm.weight language 1
        model.language_model.norm.weight language
        lm_head.weight head
    """,
    "qwen2_5_vl": """
        model.visual.patch_embed.proj.weight vision
        model.visual.blocks.0.norm1.weight vision 0
        model.visual.blocks.0.norm2.weight vision 0
        model.visual.blocks.0.attn.qkv.weight vision 0
        model.visual.blocks.0.attn.qkv.bias vision 0
        model.visual.blocks.0.attn.proj.weight vision 0
        model.visual.blocks.0.attn.proj.bias vision 0
        model.visual.blocks.0.mlp.gate_proj.weight vision 0
        model.visual.blocks.0.mlp.gate_proj.bias vision 0
        model.visual.blocks.0.mlp.up_proj.weight vision 0
        model.visual.blocks.0.mlp.up_proj.bias vision 0
        model.visual.blocks.0.mlp.down_proj.weight vision 0
        model.visual.blocks.0.mlp.down_proj.bias vision 0
        model.visual.blocks.1.norm1.weight vision 1
        model.visual.blocks.1.norm2.weight vision 1
        model.visual.blocks.1.attn.qkv.weight vision 1
        model.visual.blocks.1.attn.qkv.bias vision 1
        model.visual.blocks.1.attn.proj.weight vision 1
        model.visual.blocks.1.attn.proj.bias vision 1
        model.visual.blocks.1.mlp.gate_proj.weight vision 1
        model.visual.blocks.1.mlp.gate_proj.bias vision 1
        model.visual.blocks.1.mlp.up_proj.weight vision 1
        model.visual.blocks.1.mlp.up_proj.bias vision 1
        model.visual.blocks.1.mlp.down_proj.weight vision 1
        model.visual.blocks.1.mlp.down_proj.bias vision 1
        model.visual.merger.ln_q.weight projector
        model.visual.merger.mlp.0.weight projector
        model.visual.merger.mlp.0.bias projector
        model.visual.merger.mlp.2.weight projector
        model.visual.merger.mlp.2.bias projector
        model.language_model.embed_tokens.weight embed
        model.language_model.layers.0.self_attn.q_proj.weight language 0
        model.language_model.layers.0.self_attn.q_proj.bias language 0
        model.language_model.layers.0.self_attn.k_proj.weight language 0
        model.language_model.layers.0.self_attn.k_proj.bias language 0
        model.language_model.layers.0.self_attn.v_proj.weight language 0
        model.language_model.layers.0.self_attn.v_proj.bias language 0
        model.language_model.layers.0.self_attn.o_proj.weight language 0
        model.language_model.layers.0.mlp.gate_proj.weight language 0
        model.language_model.layers.0.mlp.up_proj.weight language 0
        model.language_model.layers.0.mlp.down_proj.weight language 0
        model.language_model.layers.0.input_layernorm.weight language 0
        model.language_model.layers.0.post_attention_layernorm.weight language 0
        model.language_model.layers.1.self_attn.q_proj.weight language 1
        model.language_model.layers.1.self_attn.q_proj.bias language 1
        model.language_model.layers.1.self_attn.k_proj.weight language 1
        model.language_model.layers.1.self_attn.k_proj.bias language 1
        model.language_model.layers.1.self_attn.v_proj.weight language 1
        model.language_model.layers.1.self_attn.v_proj.bias language 1
        model.language_model.layers.1.self_attn.o_proj.weight language 1
        model.language_model.layers.1.mlp.gate_proj.weight language 1
        model.language_model.layers.1.mlp.up_proj.weight language 1
        model.language_model.layers.1.mlp.down_proj.weight language 1
        model.language_model.layers.1.input_layernorm.weight language 1
        model.language_model.layers.1.post_attention_layernorm.weight language 1
        model.language_model.norm.weight language
        lm_head.weight head
    """,
    "idefics3": """
        model.vision_model.embeddings.patch_embedding.weight vision
        model.vision_model.embeddings.patch_embedding.bias vision
        model.vision_model.embeddings.position_embedding.weight vision
        model.vision_model.encoder.layers.0.self_attn.k_proj.weight vision 0
        model.vision_model.encoder.layers.0.self_attn.k_proj.bias vision 0
        model.vision_model.encoder.layers.0.self_attn.v_proj.weight vision 0
        model.vision_model.encoder.layers.0.self_attn.v_proj.bias vision 0
        model.vision_model.encoder.layers.0.self_attn.q_proj.weight vision 0
        model.vision_model.encoder.layers.0.self_attn.q_proj.bias vision 0
        model.vision_model.encoder.layers.0.self_attn.out_proj.weight vision 0
        model.vision_model.encoder.layers.0.self_attn.out_proj.bias vision 0
        model.vision_model.encoder.layers.0.layer_norm1.weight vision 0
        model.vision_model.encoder.layers.0.layer_norm1.bias vision 0
        model.vision_model.encoder.layers.0.mlp.fc1.weight vision 0
        model.vision_model.encoder.layers.0.mlp.fc1.bias vision 0
        model.vision_model.encoder.layers.0.mlp.fc2.weight vision 0
        model.vision_model.encoder.layers.0.mlp.fc2.bias vision 0
        model.vision_model.encoder.layers.0.layer_norm2.weight vision 0
        model.vision_model.encoder.layers.0.layer_norm2.bias vision 0
        model.vision_model.encoder.layers.1.self_attn.k_proj.weight vision 1
        model.vision_model.encoder.layers.1.self_attn.k_proj.bias vision 1
        model.vision_model.encoder.layers.1.self_attn.v_proj.weight vision 1
        model.vision_model.encoder.layers.1.self_attn.v_proj.bias vision 1
        model.vision_model.encoder.layers.1.self_attn.q_proj.weight vision 1
        model.vision_model.encoder.layers.1.self_attn.q_proj.bias vision 1
        model.vision_model.encoder.layers.1.self_attn.out_proj.weight vision 1
        model.vision_model.encoder.layers.1.self_attn.out_proj.bias vision 1
        model.vision_model.encoder.layers.1.layer_norm1.weight vision 1
        model.vision_model.encoder.layers.1.layer_norm1.bias vision 1
        model.vision_model.encoder.layers.1.mlp.fc1.weight vision 1
        model.vision_model.encoder.layers.1.mlp.fc1.bias vision 1
        model.vision_model.encoder.layers.1.mlp.fc2.weight vision 1
        model.vision_model.encoder.layers.1.mlp.fc2.bias vision 1
        model.vision_model.encoder.layers.1.layer_norm2.weight vision 1
        model.vision_model.encoder.layers.1.layer_norm2.bias vision 1
        model.vision_model.post_layernorm.weight vision
        model.vision_model.post_layernorm.bias vision
        model.connector.modality_projection.proj.weight projector
        model.text_model.embed_tokens.weight embed
        model.text_model.layers.0.self_attn.q_proj.weight language 0
        model.text_model.layers.0.self_attn.k_proj.weight language 0
        model.text_model.layers.0.self_attn.v_proj.weight language 0
        model.text_model.layers.0.self_attn.o_proj.weight language 0
        model.text_model.layers.0.mlp.gate_proj.weight language 0
        model.text_model.layers.0.mlp.up_proj.weight language 0
        model.text_model.layers.0.mlp.down_proj.weight language 0
        model.text_model.layers.0.input_layernorm.weight language 0
        model.text_model.layers.0.post_attention_layernorm.weight language 0
        model.text_model.layers.1.self_attn.q_proj.weight language 1
        model.text_model.layers.1.self_attn.k_proj.weight language 1
        model.text_model.layers.1.self_attn.v_proj.weight language 1
        model.text_model.layers.1.self_attn.o_proj.weight language 1
        model.text_model.layers.1.mlp.gate_proj.weight language 1
        model.text_model.layers.1.mlp.up_proj.weight language 1
        model.text_model.layers.1.mlp.down_proj.weight language 1
        model.text_model.layers.1.input_layernorm.weight language 1
        model.text_model.layers.1.post_attention_layernorm.weight language 1
        model.text_model.norm.weight language
        lm_head.weight head
    """,
    "paligemma": """
        model.vision_tower.embeddings.patch_embedding.weight vision
        model.vision_tower.embeddings.patch_embedding.bias vision
        model.vision_tower.embeddings.position_embedding.weight vision
        model.vision_tower.encoder.layers.0.layer_norm1.weight vision 0
        model.vision_tower.encoder.layers.0.layer_norm1.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.k_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.k_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.v_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.v_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.q_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.q_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.out_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.out_proj.bias vision 0
        model.vision_tower.encoder.layers.0.layer_norm2.weight vision 0
        model.vision_tower.encoder.layers.0.layer_norm2.bias vision 0
        model.vision_tower.encoder.layers.0.mlp.fc1.weight vision 0
        model.vision_tower.encoder.layers.0.mlp.fc1.bias vision 0
        model.vision_tower.encoder.layers.0.mlp.fc2.weight vision 0
        model.vision_tower.encoder.layers.0.mlp.fc2.bias vision 0
        model.vision_tower.encoder.layers.1.layer_norm1.weight vision 1
        model.vision_tower.encoder.layers.1.layer_norm1.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.k_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.k_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.v_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.v_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.q_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.q_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.out_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.out_proj.bias vision 1
        model.vision_tower.encoder.layers.1.layer_norm2.weight vision 1
        model.vision_tower.encoder.layers.1.layer_norm2.bias vision 1
        model.vision_tower.encoder.layers.1.mlp.fc1.weight vision 1
        model.vision_tower.encoder.layers.1.mlp.fc1.bias vision 1
        model.vision_tower.encoder.layers.1.mlp.fc2.weight vision 1
        model.vision_tower.encoder.layers.1.mlp.fc2.bias vision 1
        model.vision_tower.post_layernorm.weight vision
        model.vision_tower.post_layernorm.bias vision
        model.vision_tower.head.probe vision
        model.vision_tower.head.attention.in_proj_weight vision
        model.vision_tower.head.attention.in_proj_bias vision
        model.vision_tower.head.attention.out_proj.weight vision
        model.vision_tower.head.attention.out_proj.bias vision
        model.vision_tower.head.layernorm.weight vision
        model.vision_tower.head.layernorm.bias vision
        model.vision_tower.head.mlp.fc1.weight vision
        model.vision_tower.head.mlp.fc1.bias vision
        model.vision_tower.head.mlp.fc2.weight vision
        model.vision_tower.head.mlp.fc2.bias vision
        model.multi_modal_projector.linear.weight projector
        model.multi_modal_projector.linear.bias projector
        model.language_model.embed_tokens.weight embed
        model.language_model.layers.0.self_attn.q_proj.weight language 0
        model.language_model.layers.0.self_attn.k_proj.weight language 0
        model.language_model.layers.0.self_attn.v_proj.weight language 0
        model.language_model.layers.0.self_attn.o_proj.weight language 0
        model.language_model.layers.0.mlp.gate_proj.weight language 0
        model.language_model.layers.0.mlp.up_proj.weight language 0
        model.language_model.layers.0.mlp.down_proj.weight language 0
        model.language_model.layers.0.input_layernorm.weight language 0
        model.language_model.layers.0.post_attention_layernorm.weight language 0
        model.language_model.layers.1.self_attn.q_proj.weight language 1
        model.language_model.layers.1.self_attn.k_proj.weight language 1
        model.language_model.layers.1.self_attn.v_proj.weight language 1
        model.language_model.layers.1.self_attn.o_proj.weight language 1
        model.language_model.layers.1.mlp.gate_proj.weight language 1
        model.language_model.layers.1.mlp.up_proj.weight language 1
        model.language_model.layers.1.mlp.down_proj.weight language 1
        model.language_model.layers.1.input_layernorm.weight language 1
        model.language_model.layers.1.post_attention_layernorm.weight language 1
        model.language_model.norm.weight language
    """,
    "gemma3": """
        model.vision_tower.embeddings.patch_embedding.weight vision
        model.vision_tower.embeddings.patch_embedding.bias vision
        model.vision_tower.embeddings.position_embedding.weight vision
        model.vision_tower.encoder.layers.0.layer_norm1.weight vision 0
        model.vision_tower.encoder.layers.0.layer_norm1.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.k_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.k_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.v_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.v_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.q_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.q_proj.bias vision 0
        model.vision_tower.encoder.layers.0.self_attn.out_proj.weight vision 0
        model.vision_tower.encoder.layers.0.self_attn.out_proj.bias vision 0
        model.vision_tower.encoder.layers.0.layer_norm2.weight vision 0
        model.vision_tower.encoder.layers.0.layer_norm2.bias vision 0
        model.vision_tower.encoder.layers.0.mlp.fc1.weight vision 0
        model.vision_tower.encoder.layers.0.mlp.fc1.bias vision 0
        model.vision_tower.encoder.layers.0.mlp.fc2.weight vision 0
        model.vision_tower.encoder.layers.0.mlp.fc2.bias vision 0
        model.vision_tower.encoder.layers.1.layer_norm1.weight vision 1
        model.vision_tower.encoder.layers.1.layer_norm1.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.k_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.k_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.v_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.v_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.q_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.q_proj.bias vision 1
        model.vision_tower.encoder.layers.1.self_attn.out_proj.weight vision 1
        model.vision_tower.encoder.layers.1.self_attn.out_proj.bias vision 1
        model.vision_tower.encoder.layers.1.layer_norm2.weight vision 1
        model.vision_tower.encoder.layers.1.layer_norm2.bias vision 1
        model.vision_tower.encoder.layers.1.mlp.fc1.weight vision 1
        model.vision_tower.encoder.layers.1.mlp.fc1.bias vision 1
        model.vision_tower.encoder.layers.1.mlp.fc2.weight vision 1
        model.vision_tower.encoder.layers.1.mlp.fc2.bias vision 1
        model.vision_tower.post_layernorm.weight vision
        model.vision_tower.post_layernorm.bias vision
        model.vision_tower.head.probe vision
        model.vision_tower.head.attention.in_proj_weight vision
        model.vision_tower.head.attention.in_proj_bias vision
        model.vision_tower.head.attention.out_proj.weight vision
        model.vision_tower.head.attention.out_proj.bias vision
        model.vision_tower.head.layernorm.weight vision
        model.vision_tower.head.layernorm.bias vision
        model.vision_tower.head.mlp.fc1.weight vision
        model.vision_tower.head.mlp.fc1.bias vision
        model.vision_tower.head.mlp.fc2.weight vision
        model.vision_tower.head.mlp.fc2.bias vision
        model.multi_modal_projector.mm_input_projection_weight projector
        model.multi_modal_projector.mm_soft_emb_norm.weight projector
        model.language_model.embed_tokens.weight embed
        model.language_model.layers.0.self_attn.q_proj.weight language 0
        model.language_model.layers.0.self_attn.k_proj.weight language 0
        model.language_model.layers.0.self_attn.v_proj.weight language 0
        model.language_model.layers.0.self_attn.o_proj.weight language 0
        model.language_model.layers.0.self_attn.q_norm.weight language 0
        model.language_model.layers.0.self_attn.k_norm.weight language 0
        model.language_model.layers.0.mlp.gate_proj.weight language 0
        model.language_model.layers.0.mlp.up_proj.weight language 0
        model.language_model.layers.0.mlp.down_proj.weight language 0
        model.language_model.layers.0.input_layernorm.weight language 0
        model.language_model.layers.0.post_attention_layernorm.weight language 0
        model.language_model.layers.0.pre_feedforward_layernorm.weight language 0
        model.language_model.layers.0.post_feedforward_layernorm.weight language 0
        model.language_model.layers.1.self_attn.q_proj.weight language 1
        model.language_model.layers.1.self_attn.k_proj.weight language 1
        model.language_model.layers.1.self_attn.v_proj.weight language 1
        model.language_model.layers.1.self_attn.o_proj.weight language 1
        model.language_model.layers.1.self_attn.q_norm.weight language 1
        model.language_model.layers.1.self_attn.k_norm.weight language 1
        model.language_model.layers.1.mlp.gate_proj.weight language 1
        model.language_model.layers.1.mlp.up_proj.weight language 1
        model.language_model.layers.1.mlp.down_proj.weight language 1
        model.language_model.layers.1.input_layernorm.weight language 1
        model.language_model.layers.1.post_attention_layernorm.weight language 1
        model.language_model.layers.1.pre_feedforward_layernorm.weight language 1
        model.language_model.layers.1.post_feedforward_layernorm.weight language 1
        model.language_model.norm.weight language
    """,
    "llama": """
        model.embed_tokens.weight embed
        model.layers.0.self_attn.q_proj.weight language 0
        model.layers.0.self_attn.k_proj.weight language 0
        model.layers.0.self_attn.v_proj.weight language 0
        model.layers.0.self_attn.o_proj.weight language 0
        model.layers.0.mlp.gate_proj.weight language 0
        model.layers.0.mlp.up_proj.weight language 0
        model.layers.0.mlp.down_proj.weight language 0
        model.layers.0.input_layernorm.weight language 0
        model.layers.0.post_attention_layernorm.weight language 0
        model.layers.1.self_attn.q_proj.weight language 1
        model.layers.1.self_attn.k_proj.weight language 1
        model.layers.1.self_attn.v_proj.weight language 1
        model.layers.1.self_attn.o_proj.weight language 1
        model.layers.1.mlp.gate_proj.weight language 1
        model.layers.1.mlp.up_proj.weight language 1
        model.layers.1.mlp.down_proj.weight language 1
        model.layers.1.input_layernorm.weight language 1
        model.layers.1.post_attention_layernorm.weight language 1
        model.norm.weight language
        lm_head.weight head
    """,
    "qwen2": """
        model.embed_tokens.weight embed
        model.layers.0.self_attn.q_proj.weight language 0
        model.layers.0.self_attn.q_proj.bias language 0
        model.layers.0.self_attn.k_proj.weight language 0
        model.layers.0.self_attn.k_proj.bias language 0
        model.layers.0.self_attn.v_proj.weight language 0
        model.layers.0.self_attn.v_proj.bias language 0
        model.layers.0.self_attn.o_proj.weight language 0
        model.layers.0.mlp.gate_proj.weight language 0
        model.layers.0.mlp.up_proj.weight language 0
        model.layers.0.mlp.down_proj.weight language 0
        model.layers.0.input_layernorm.weight language 0
        model.layers.0.post_attention_layernorm.weight language 0
        model.layers.1.self_attn.q_proj.weight language 1
        model.layers.1.self_attn.q_proj.bias language 1
        model.layers.1.self_attn.k_proj.weight language 1
        model.layers.1.self_attn.k_proj.bias language 1
        model.layers.1.self_attn.v_proj.weight language 1
        model.layers.1.self_attn.v_proj.bias language 1
        model.layers.1.self_attn.o_proj.weight language 1
        model.layers.1.mlp.gate_proj.weight language 1
        model.layers.1.mlp.up_proj.weight language 1
        model.layers.1.mlp.down_proj.weight language 1
        model.layers.1.input_layernorm.weight language 1
        model.layers.1.post_attention_layernorm.weight language 1
        model.norm.weight language
        lm_head.weight head
    """,
    "gemma3_text": """
        model.embed_tokens.weight embed
        model.layers.0.self_attn.q_proj.weight language 0
        model.layers.0.self_attn.k_proj.weight language 0
        model.layers.0.self_attn.v_proj.weight language 0
        model.layers.0.self_attn.o_proj.weight language 0
        model.layers.0.self_attn.q_norm.weight language 0
        model.layers.0.self_attn.k_norm.weight language 0
        model.layers.0.mlp.gate_proj.weight language 0
        model.layers.0.mlp.up_proj.weight language 0
        model.layers.0.mlp.down_proj.weight language 0
        model.layers.0.input_layernorm.weight language 0
        model.layers.0.post_attention_layernorm.weight language 0
        model.layers.0.pre_feedforward_layernorm.weight language 0
        model.layers.0.post_feedforward_layernorm.weight language 0
        model.layers.1.self_attn.q_proj.weight language 1
        model.layers.1.self_attn.k_proj.weight language 1
        model.layers.1.self_attn.v_proj.weight language 1
        model.layers.1.self_attn.o_proj.weight language 1
        model.layers.1.self_attn.q_norm.weight language 1
        model.layers.1.self_attn.k_norm.weight language 1
        model.layers.1.mlp.gate_proj.weight language 1
        model.layers.1.mlp.up_proj.weight language 1
        model.layers.1.mlp.down_proj.weight language 1
        model.layers.1.input_layernorm.weight language 1
        model.layers.1.post_attention_layernorm.weight language 1
        model.layers.1.pre_feedforward_layernorm.weight language 1
        model.layers.1.post_feedforward_layernorm.weight language 1
        model.norm.weight language
    """,
}


def _table(text: str) -> dict[str, tuple[str, int | None]]:
    out = {}
    for line in text.strip().splitlines():
        name, comp, *block = line.split()
        out[name] = (comp, int(block[0]) if block else None)
    return out


@pytest.fixture(scope="module")
def layouts(tiny) -> dict[str, Layout]:
    return {name: discover(tiny(name)) for name in BUILDERS}


def test_expected_covers_every_builder():
    assert set(EXPECTED) == set(BUILDERS)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_exact_assignment(name, layouts):
    got = {n: (p.component, p.block) for n, p in layouts[name].params.items()}
    expected = _table(EXPECTED[name])
    assert got == expected
    assert list(got) == list(expected)  # named_parameters order


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_parameter_placed_exactly_once(name, tiny, layouts):
    model, layout = tiny(name), layouts[name]
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    listed = [n for p in layout.params.values() for n in (p.name, *p.ties)]
    assert sorted(listed) == sorted(all_names)
    assert len(listed) == len(set(listed))
    assert all(p.component in COMPONENTS for p in layout.params.values())
    assert layout.other == []
    assert layout.buffers == []  # the zoo's buffers are all non-persistent
    for n, p in layout.params.items():
        t = model.get_parameter(n)
        assert (p.shape, p.dtype) == (tuple(t.shape), t.dtype)


@pytest.mark.parametrize("name,blocks", [
    ("llava", {"vision": 2, "language": 2}), ("qwen2_vl", {"vision": 2, "language": 2}),
    ("gemma3", {"vision": 2, "language": 2}), ("llama", {"vision": 0, "language": 2}),
])
def test_num_blocks(name, blocks, layouts):
    expected = dict.fromkeys(COMPONENTS, 0) | blocks
    assert layouts[name].num_blocks == expected


def test_depths_llava(layouts):
    p = layouts["llava"].params
    assert p["model.vision_tower.embeddings.patch_embedding.weight"].depth == 0.0
    assert p["model.vision_tower.pre_layrnorm.weight"].depth == 0.0
    assert p["model.vision_tower.encoder.layers.0.mlp.fc1.weight"].depth == 0.0
    assert p["model.vision_tower.encoder.layers.1.mlp.fc1.weight"].depth == 1.0
    assert p["model.vision_tower.post_layernorm.weight"].depth == 1.0
    assert p["model.language_model.layers.1.self_attn.q_proj.weight"].depth == 1.0
    assert p["model.language_model.norm.weight"].depth == 1.0
    assert p["model.multi_modal_projector.linear_2.weight"].depth == 0.0
    assert p["lm_head.weight"].depth == 0.0


def test_depths_qwen_and_gemma(layouts):
    q = layouts["qwen2_vl"].params
    assert q["model.visual.patch_embed.proj.weight"].depth == 0.0
    assert q["model.visual.blocks.1.attn.qkv.weight"].depth == 1.0
    assert q["model.visual.merger.mlp.2.weight"].depth == 0.0  # projector has no blocks
    g = layouts["gemma3"].params
    assert g["model.vision_tower.head.probe"].depth == 1.0  # after the last vision block
    assert g["model.language_model.layers.0.self_attn.q_norm.weight"].depth == 0.0


def test_depth_spacing_with_four_blocks():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1))
    p = discover(model).params
    assert [p[f"model.layers.{i}.mlp.up_proj.weight"].depth for i in range(4)] == [
        0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    assert p["model.embed_tokens.weight"].depth == 0.0


@pytest.mark.parametrize("name,embed", [
    ("paligemma", "model.language_model.embed_tokens.weight"),
    ("gemma3", "model.language_model.embed_tokens.weight"),
    ("gemma3_text", "model.embed_tokens.weight"),
])
def test_tied_embed_and_head(name, embed, layouts):
    layout = layouts[name]
    assert layout.params[embed].ties == ("lm_head.weight",)
    assert layout.params[embed].component == "embed"
    assert "lm_head.weight" not in layout.params
    assert layout.resolve("lm_head.weight") is layout.params[embed]
    assert layout.by_component("head") == []
    assert layout.ties == {embed: ("lm_head.weight",)}


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "idefics3", "llama"])
def test_untied_have_no_ties(name, layouts):
    assert layouts[name].ties == {}
    assert [p.name for p in layouts[name].by_component("head")] == ["lm_head.weight"]


def test_gemma3_projector_is_transposed_bare_parameter(layouts):
    info = layouts["gemma3"].params["model.multi_modal_projector.mm_input_projection_weight"]
    assert (info.component, info.shape) == ("projector", (24, 32))  # [vision, text]


def test_summary(layouts):
    s = layouts["llava"].summary()
    assert list(s) == list(COMPONENTS)
    assert s["projector"] == {"blocks": 0, "tensors": 4, "parameters": 32 * 24 + 32 + 32 * 32 + 32,
                              "dtypes": ["float32"], "bytes": 4 * (32 * 24 + 32 + 32 * 32 + 32)}
    assert s["embed"]["parameters"] == 320 * 32
    assert s["language"]["blocks"] == 2 and s["other"]["tensors"] == 0
    assert sum(c["tensors"] for c in s.values()) == len(layouts["llava"].params)


def test_paraminfo_is_frozen(layouts):
    info = layouts["llama"].params["model.norm.weight"]
    assert isinstance(info, ParamInfo)
    with pytest.raises(AttributeError):
        info.component = "other"  # type: ignore[misc]


def test_unplaced_parameters_go_to_other(tiny):
    model = copy.deepcopy(tiny("llava"))
    model.value_head = nn.Linear(32, 1)  # text width, but nothing from vision: not a projector
    model.register_buffer("calibration", torch.ones(3))  # persistent buffer: reported
    layout = discover(model)
    assert layout.other == ["value_head.weight", "value_head.bias"]
    assert layout.params["value_head.weight"].component == "other"
    assert layout.buffers == ["calibration"]


def test_bf16_dtype_in_summary(tiny):
    model = copy.deepcopy(tiny("llama")).to(torch.bfloat16)
    s = discover(model).summary()
    assert s["language"]["dtypes"] == ["bfloat16"]
    assert s["embed"]["bytes"] == 320 * 32 * 2


def test_model_without_config_raises():
    with pytest.raises(LayoutError, match="no `.config`"):
        discover(nn.Linear(2, 2))


def test_model_without_language_blocks_raises():
    from types import SimpleNamespace

    model = nn.Module()
    model.config = SimpleNamespace(hidden_size=4)
    model.proj = nn.Linear(4, 4)
    with pytest.raises(LayoutError, match="no ModuleList of blocks in the language model"):
        discover(model)


def test_vlm_whose_vision_config_no_module_carries_raises(tiny):
    model = copy.deepcopy(tiny("llava"))
    model.config.vision_config = copy.deepcopy(model.config.vision_config)
    model.config.vision_config.hidden_size = 99  # now equal to no module's config either
    with pytest.raises(LayoutError, match="cannot find the vision tower"):
        discover(model)


def test_by_component_rejects_unknown(layouts):
    with pytest.raises(LayoutError, match="unknown component"):
        layouts["llava"].by_component("decoder")


def test_equal_vision_and_text_width_falls_back_to_known_names():
    import transformers as tf

    from vlmexp.zoo.tiny import IMAGE_TOKEN, VIDEO_TOKEN, _qwen_text

    torch.manual_seed(0)
    cfg = tf.Qwen2VLConfig(  # vision blocks as wide as the text model: width can't tell
        text_config=_qwen_text(),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN)
    layout = discover(tf.Qwen2VLForConditionalGeneration(cfg))
    assert layout.projector == ["model.visual.merger"]
    assert {p.component for n, p in layout.params.items() if ".merger." in n} == {"projector"}
    assert layout.params["model.visual.patch_embed.proj.weight"].component == "vision"


@pytest.mark.parametrize("name,projector,vision,language", [
    ("llava", ["model.multi_modal_projector"], "model.vision_tower", "model.language_model"),
    ("llava_next", ["model.image_newline", "model.multi_modal_projector"], "model.vision_tower",
     "model.language_model"),
    ("qwen2_vl", ["model.visual.merger"], "model.visual", "model.language_model"),
    ("qwen2_5_vl", ["model.visual.merger"], "model.visual", "model.language_model"),
    ("idefics3", ["model.connector"], "model.vision_model", "model.text_model"),
    ("paligemma", ["model.multi_modal_projector"], "model.vision_tower", "model.language_model"),
    ("gemma3", ["model.multi_modal_projector"], "model.vision_tower", "model.language_model"),
    ("llama", [], None, "model"),
    ("qwen2", [], None, "model"),
    ("gemma3_text", [], None, "model"),
])
def test_projector_and_component_modules(name, projector, vision, language, layouts):
    layout = layouts[name]
    assert layout.projector == projector
    assert layout.modules.get("vision") == vision
    assert layout.modules["language"] == language
    assert layout.modules["head"] == "lm_head"
