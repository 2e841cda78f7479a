"""Tests for vlmexp.layout.align: LLM → VLM and same-architecture mappings, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from vlmexp.errors import AlignmentError
from vlmexp.layout import align, discover


def _llm_like(text_config, cls_config, cls_model) -> torch.nn.Module:
    """A text-only LLM built with `text_config`'s values (mrope sections dropped)."""
    values = text_config.to_dict()
    values.pop("model_type", None)
    rope = values.get("rope_parameters")
    if isinstance(rope, dict) and "mrope_section" in rope:
        values["rope_parameters"] = {k: v for k, v in rope.items() if k != "mrope_section"}
    torch.manual_seed(1)  # other weights than the VLM's
    return cls_model(cls_config(**values)).eval()


def _copy_through(base: torch.nn.Module, donor: torch.nn.Module, mapping: dict[str, str]):
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for b, d in mapping.items():
            merged.get_parameter(b).copy_(donor.get_parameter(d))
    return merged


def _text_logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


IDS = torch.tensor([[5, 17, 33, 99, 120, 7, 250, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("vlm,config_cls,model_cls,kw", [
    ("llava", tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    ("idefics3", tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    ("qwen2_vl", tf.Qwen2Config, tf.Qwen2ForCausalLM, {"mm_token_type_ids": torch.zeros_like(IDS)}),
    ("gemma3", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {}),
])
def test_llm_weights_through_mapping_give_identical_text_logits(tiny, vlm, config_cls, model_cls, kw):
    base = tiny(vlm)
    donor = _llm_like(base.config.get_text_config(), config_cls, model_cls)
    a = align(base, donor)
    assert a.kind == "llm_to_vlm" and a.config_diffs == [] and a.rows == {}
    merged = _copy_through(base, donor, a.mapping)
    want = _text_logits(donor, IDS)
    assert not torch.equal(_text_logits(base, IDS, **kw), want)  # the copy is what makes them equal
    assert torch.equal(_text_logits(merged, IDS, **kw), want)


def test_llama_to_llava_mapping(tiny):
    a = align(tiny("llava"), tiny("llama"))
    m = a.mapping
    assert m["model.language_model.embed_tokens.weight"] == "model.embed_tokens.weight"
    assert m["model.language_model.layers.1.mlp.down_proj.weight"] == "model.layers.1.mlp.down_proj.weight"
    assert m["model.language_model.norm.weight"] == "model.norm.weight"
    assert m["lm_head.weight"] == "lm_head.weight"
    assert len(m) == 21
    base = discover(tiny("llava"))
    assert a.missing == [n for n, p in base.params.items() if p.component in ("vision", "projector")]
    assert len(a.missing) == 43


@pytest.mark.parametrize("vlm,llm", [
    ("llava", "llama"), ("llava_next", "llama"), ("idefics3", "llama"),
    ("qwen2_vl", "qwen2"), ("qwen2_5_vl", "qwen2"), ("gemma3", "gemma3_text"),
])
def test_every_donor_param_mapped_once(tiny, vlm, llm):
    a = align(tiny(vlm), tiny(llm))
    donor = discover(tiny(llm))
    assert sorted(a.mapping.values()) == sorted(donor.params)  # each donor tensor exactly once
    base = discover(tiny(vlm))
    for b, d in a.mapping.items():
        assert base.params[b].shape == donor.params[d].shape
        assert base.params[b].component == donor.params[d].component
        assert base.params[b].block == donor.params[d].block
    assert set(a.missing) | set(a.mapping) == set(base.params)
    assert {base.params[n].component for n in a.missing} == {"vision", "projector"}


def test_gemma3_text_to_gemma3_tied(tiny):
    a = align(tiny("gemma3"), tiny("gemma3_text"))
    assert a.mapping["model.language_model.embed_tokens.weight"] == "model.embed_tokens.weight"
    assert "lm_head.weight" not in a.mapping  # tied: folded into embed on both sides
    assert len(a.mapping) == 28


def test_qwen2_to_qwen2_vl_reports_rms_norm_eps(tiny):
    a = align(tiny("qwen2_vl"), tiny("qwen2"))  # Qwen2-VL text default 1e-5, Qwen2 1e-6
    assert a.config_diffs == ["rms_norm_eps: 1e-05 vs 1e-06"]
    assert "rms_norm_eps: 1e-05 vs 1e-06" in a.describe()
    assert a.mapping["model.language_model.layers.0.self_attn.q_proj.bias"] == (
        "model.layers.0.self_attn.q_proj.bias")


def test_config_diffs_act_and_rope(tiny):
    base = tiny("llava")
    values = base.config.text_config.to_dict()
    values.update(rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                  hidden_act="gelu")
    donor = tf.LlamaForCausalLM(tf.LlamaConfig(**values))
    diffs = align(base, donor).config_diffs
    assert diffs == [
        "hidden_act: silu vs gelu",
        "rope_parameters: {'rope_theta': 10000.0, 'rope_type': 'default'} vs "
        "{'rope_type': 'default', 'rope_theta': 500000.0}",
    ]


def test_same_architecture_identity(tiny):
    base = tiny("qwen2_5_vl")
    a = align(base, copy.deepcopy(base))
    assert a.kind == "same" and a.missing == [] and a.config_diffs == []
    assert a.mapping == {n: n for n in discover(base).params}


def test_block_count_mismatch(tiny):
    values = tiny("llava").config.text_config.to_dict() | {"num_hidden_layers": 3}
    donor = tf.LlamaForCausalLM(tf.LlamaConfig(**values))
    with pytest.raises(AlignmentError, match="language blocks differ: 2 vs 3"):
        align(tiny("llava"), donor)


def test_shape_mismatch_names_tensors(tiny):
    values = tiny("llava").config.text_config.to_dict() | {"intermediate_size": 48}
    donor = tf.LlamaForCausalLM(tf.LlamaConfig(**values))
    with pytest.raises(AlignmentError) as err:
        align(tiny("llava"), donor)
    msg = str(err.value)
    assert "shapes differ" in msg and "\n" not in msg
    assert "model.language_model.layers.0.mlp.gate_proj.weight [64, 32] vs " \
           "model.layers.0.mlp.gate_proj.weight [48, 32]" in msg
    assert "(6 in all)" in msg  # gate/up/down in two blocks


def test_donor_param_that_maps_nowhere(tiny):
    with pytest.raises(AlignmentError, match=r"donor tensors that map nowhere: .*q_proj\.bias"):
        align(tiny("llava"), tiny("qwen2"))  # Qwen2 has attention biases, Llama does not


def test_vlm_donor_of_other_architecture_refused(tiny):
    with pytest.raises(AlignmentError, match="only same-architecture or LLM → VLM"):
        align(tiny("llava"), tiny("idefics3"))


def test_separate_head_into_tied_base_refused(tiny):
    values = tiny("gemma3").config.text_config.to_dict() | {"tie_word_embeddings": False}
    donor = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**values))
    with pytest.raises(AlignmentError, match="tied where the donor's are separate"):
        align(tiny("gemma3"), donor)


def _llama_with_vocab(tiny, n: int) -> torch.nn.Module:
    values = tiny("llava").config.text_config.to_dict() | {"vocab_size": n}
    torch.manual_seed(2)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**values)).eval()


def test_vocab_mismatch_errors_by_default(tiny):
    with pytest.raises(AlignmentError, match="vocabulary sizes differ: base 320 vs donor 300"):
        align(tiny("llava"), _llama_with_vocab(tiny, 300))


def test_vocab_common_rows(tiny):
    base, donor = tiny("llava"), _llama_with_vocab(tiny, 300)
    a = align(base, donor, vocab="common_rows")
    assert a.rows == {"model.language_model.embed_tokens.weight": 300, "lm_head.weight": 300}
    assert a.mapping["lm_head.weight"] == "lm_head.weight"
    assert "first 300 rows" in a.describe()
    bigger = align(base, _llama_with_vocab(tiny, 400), vocab="common_rows")
    assert bigger.rows["lm_head.weight"] == 320


def test_bad_vocab_policy(tiny):
    with pytest.raises(AlignmentError, match="vocab must be"):
        align(tiny("llava"), tiny("llama"), vocab="truncate")


def test_llm_base_is_not_a_vlm(tiny):
    with pytest.raises(AlignmentError, match="only same-architecture or LLM → VLM"):
        align(tiny("llama"), tiny("qwen2"))
