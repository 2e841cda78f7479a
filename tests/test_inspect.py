"""Tests for `python -m vlmexp inspect`: tiny models, saved folders in both key layouts, errors."""

from __future__ import annotations

import json

import pytest

from vlmexp.cli import main
from vlmexp.layout import discover
from vlmexp.zoo.tiny import BUILDERS


def _json(capsys, *argv: str) -> dict:
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_tiny_text_output(capsys):
    assert main(["inspect", "tiny:qwen2_vl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tiny:qwen2_vl: Qwen2VLForConditionalGeneration"
    rows = {line.split()[0]: line.split() for line in out[2:8]}
    assert list(rows) == ["vision", "projector", "language", "embed", "head", "other"]
    assert rows["vision"][1:4] == ["2", "25", "10,592"]
    assert rows["projector"][1:4] == ["0", "6", "6,272"] and rows["projector"][-1] == "model.visual.merger"
    assert rows["language"][1:3] == ["2", "25"] and rows["language"][-1] == "model.language_model"
    assert rows["head"][1:4] == ["0", "1", "10,240"]
    assert out[-1] == "  other: none"


def test_tiny_json_matches_discover(capsys, tiny):
    out = _json(capsys, "tiny:gemma3")
    [model] = out["models"]
    layout = discover(tiny("gemma3"))
    assert model["architecture"] == "Gemma3ForConditionalGeneration"
    assert model["components"] == layout.summary()
    assert model["ties"] == {"model.language_model.embed_tokens.weight": ["lm_head.weight"]}
    assert model["projector"] == ["model.multi_modal_projector"]
    assert model["other"] == [] and model["buffers"] == []
    assert model["params"]["model.multi_modal_projector.mm_input_projection_weight"] == {
        "component": "projector", "block": None, "depth": 0.0, "shape": [24, 32],
        "dtype": "float32", "ties": []}
    assert "alignment" not in out


def test_two_models_align_text(capsys):
    assert main(["inspect", "tiny:qwen2_vl", "tiny:qwen2"]) == 0
    out = capsys.readouterr().out
    assert ("LLM → VLM: Qwen2ForCausalLM → Qwen2VLForConditionalGeneration: "
            "27 tensors mapped, 31 keep the base's weights") in out
    assert "config differs: rms_norm_eps: 1e-05 vs 1e-06" in out
    assert "tiny:qwen2: Qwen2ForCausalLM" in out


def test_two_models_align_json(capsys):
    out = _json(capsys, "tiny:llava", "tiny:llama")
    a = out["alignment"]
    assert a["kind"] == "llm_to_vlm" and len(a["mapping"]) == 21 and len(a["missing"]) == 43
    assert a["mapping"]["model.language_model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.up_proj.weight"
    assert [m["architecture"] for m in out["models"]] == ["LlavaForConditionalGeneration", "LlamaForCausalLM"]


def test_vocab_option(capsys, tmp_path, tiny):
    import transformers as tf

    from vlmexp.checkpoint import save_model

    values = tiny("llava").config.text_config.to_dict() | {"vocab_size": 300}
    folder = save_model(tf.LlamaForCausalLM(tf.LlamaConfig(**values)), tmp_path / "llama300")
    assert main(["inspect", "tiny:llava", str(folder)]) == 2
    assert "vocabulary sizes differ: base 320 vs donor 300" in capsys.readouterr().err
    out = _json(capsys, "tiny:llava", str(folder), "--vocab", "common_rows")
    assert out["alignment"]["rows"] == {"model.language_model.embed_tokens.weight": 300,
                                        "lm_head.weight": 300}


def test_models_that_do_not_align_exit_2_with_one_line(capsys):
    assert main(["inspect", "tiny:llava", "tiny:qwen2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err
    assert err.startswith("vlmexp inspect: error: base LlavaForConditionalGeneration and donor "
                          "Qwen2ForCausalLM: donor tensors that map nowhere: ")


def test_unknown_tiny_name(capsys):
    assert main(["inspect", "tiny:nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown tiny model 'tiny:nope'" in err and "tiny:llava" in err


def test_missing_folder_is_one_line_error(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "absent")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "absent" in captured.err


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """`saved(name)` → (legacy folder, native folder) of the tiny model, written once."""
    from vlmexp.checkpoint import save_model

    root = tmp_path_factory.mktemp("inspect_saved")
    cache: dict[str, tuple[str, str]] = {}

    def get(name: str) -> tuple[str, str]:
        if name not in cache:
            legacy = save_model(tiny(name), root / f"{name}-legacy")
            native = save_model(tiny(name), root / f"{name}-native", native_layout=True)
            cache[name] = (str(legacy), str(native))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(BUILDERS))
def test_saved_legacy_and_native_give_the_same_layout(capsys, tiny, saved, name):
    legacy, native = saved(name)
    out = _json(capsys, legacy, native)
    a, b = out["models"]
    want = discover(tiny(name))
    assert a["params"] == b["params"]
    assert {n: (p["component"], p["block"]) for n, p in a["params"].items()} == {
        n: (p.component, p.block) for n, p in want.params.items()}
    assert a["components"] == b["components"] == want.summary()
    alignment = out["alignment"]
    assert alignment["kind"] == "same" and alignment["missing"] == []
    assert alignment["mapping"] == {n: n for n in want.params}
    assert alignment["config_diffs"] == []


def test_inspect_shows_what_cannot_be_merged_and_what_each_donor_reaches(tmp_path, capsys):
    from vlmexp.checkpoint import save_model
    from vlmexp.zoo.tiny import perturb, qwen2_vl

    folder = save_model(qwen2_vl(tie_word_embeddings=True), tmp_path / "tied")
    donor = save_model(perturb(qwen2_vl(tie_word_embeddings=True), 1), tmp_path / "ft")
    assert main(["inspect", str(folder), str(donor)]) == 0
    out = capsys.readouterr().out
    assert "  tied: model.language_model.embed_tokens.weight = lm_head.weight" in out
    assert "  cannot be merged: head (no tensors of its own)" in out
    assert "  reaches: vision (25 tensors), projector (6 tensors), language (25 tensors), " \
           "embed (1 tensors)\n  cannot change: nothing\n" in out
    assert main(["inspect", "tiny:qwen2_vl", "tiny:qwen2", "tiny:qwen2_vl", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["alignments"]
    assert found["tiny:qwen2"]["reach"] == {"language": 25, "embed": 1, "head": 1}
    assert found["tiny:qwen2_vl"]["reach"] == {"vision": 25, "projector": 6, "language": 25,
                                               "embed": 1, "head": 1}
