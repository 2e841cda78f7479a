"""The demo zoo: it builds offline, deterministically, and its specialists really differ."""

from __future__ import annotations

import dataclasses
import filecmp
import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from vlmexp.checkpoint import folder_weights_sha256
from vlmexp.zoo import data
from vlmexp.zoo.build import (
    ZooPaths,
    ZooSettings,
    build_processor,
    check_tokenizer,
    ensure_zoo,
)

pytestmark = pytest.mark.slow

EVALS = Path(__file__).resolve().parent.parent / "evals" / "demo"
# A few steps of every phase: the same code path as the full zoo, in seconds.
SMALL = ZooSettings(position_items=64, recitation_items=64, vqa_items=64,
                    pretrain_steps=6, vqa_steps=4, text_steps=4)


@pytest.fixture(scope="session")
def zoo(demo_zoo: ZooPaths) -> ZooPaths:
    """The full default zoo, built once per session (conftest's `demo_zoo`)."""
    return demo_zoo


@pytest.fixture(scope="session")
def processor(zoo: ZooPaths):
    return tf.AutoProcessor.from_pretrained(zoo.base)


def _acc(zoo: ZooPaths, processor, model, task: str) -> float:
    from vlmexp.eval.evaluator import Evaluator

    ev = Evaluator.from_config({"tasks": [str(zoo.evals / f"{task}.yaml")]}, processor)
    result = ev.evaluate(model)
    (name,) = result.metrics
    return result.metrics[name]["acc"]


def test_small_build_is_deterministic(tmp_path: Path) -> None:
    a = ensure_zoo(tmp_path / "a", settings=SMALL, progress=False)
    b = ensure_zoo(tmp_path / "b", settings=SMALL, progress=False)
    manifest = json.loads((a.root / "zoo.json").read_text())
    for name in ("base", "vqa_expert", "text_expert"):
        digest = folder_weights_sha256(getattr(a, name))
        assert folder_weights_sha256(getattr(b, name)) == digest, name
        # zoo.json records the digest a recipe pins the model by
        assert manifest["weights_sha256"][getattr(a, name).name] == digest, name
    assert a.root.name == SMALL.key() and a.root.name != ZooSettings().key()


def test_ensure_zoo_reuses_the_cache(tmp_path: Path) -> None:
    first = ensure_zoo(tmp_path, settings=SMALL, progress=False)
    stamp = (first.root / "zoo.json").stat().st_mtime_ns
    again = ensure_zoo(tmp_path, settings=SMALL, progress=False)
    assert again == first and (again.root / "zoo.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [SMALL.key()]  # no temporary folder left
    other = dataclasses.replace(SMALL, seed=1)
    assert ensure_zoo(tmp_path, settings=other, progress=False).root.name == other.key()


def test_tokenizer_has_one_token_per_answer_word() -> None:
    tok = build_processor(ZooSettings()).tokenizer
    check_tokenizer(tok)
    assert tok(" seven", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("seven")]
    assert tok("Answer:", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(["Answer", ":"])


def test_processor_reloads_and_expands_image_to_model_length(zoo: ZooPaths, processor) -> None:
    assert type(processor).__name__ == "LlavaProcessor" and not processor.chat_template
    model = tf.LlavaForConditionalGeneration.from_pretrained(zoo.base)
    image = data.color_shape_items(1, 0)[0].image
    inputs = processor(text="<image>\nWhat colour is the shape?\nAnswer:", images=image,
                       return_tensors="pt")
    n = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert n == model.config.image_seq_length == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_text_expert_maps_onto_base_language_model(zoo: ZooPaths) -> None:
    base = tf.LlavaForConditionalGeneration.from_pretrained(zoo.base)
    text = tf.AutoModelForCausalLM.from_pretrained(zoo.text_expert)
    assert type(text) is tf.LlamaForCausalLM
    assert text.config.rms_norm_eps == base.config.text_config.rms_norm_eps
    base_shapes = {k: v.shape for k, v in base.state_dict().items()}
    mapped = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v.shape
              for k, v in text.state_dict().items()}
    assert mapped == {k: s for k, s in base_shapes.items()
                      if k.startswith("model.language_model.") or k == "lm_head.weight"}


def test_shipped_evals_are_what_the_module_writes(tmp_path: Path) -> None:
    data.write_evals(tmp_path)
    shipped = sorted(p.relative_to(EVALS) for p in EVALS.rglob("*") if p.is_file())
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert shipped == written
    _, mismatch, errors = filecmp.cmpfiles(EVALS, tmp_path, [str(p) for p in shipped], shallow=False)
    assert not mismatch and not errors


def test_eval_splits_are_held_out() -> None:
    splits = data.next_item_splits()
    questions = {k: {it.question for it in v} for k, v in splits.items()}
    assert len(questions["val"]) >= 60 and len(questions["test"]) >= 60
    assert not questions["train"] & questions["val"] and not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]


@pytest.mark.parametrize("split", ["val", "test"])
def test_vqa_expert_wins_colour_and_shape(zoo: ZooPaths, processor, split: str) -> None:
    base = tf.LlavaForConditionalGeneration.from_pretrained(zoo.base)
    vqa = tf.LlavaForConditionalGeneration.from_pretrained(zoo.vqa_expert)
    task = f"color_shape_{split}"
    assert _acc(zoo, processor, vqa, task) >= _acc(zoo, processor, base, task) + 0.3


@pytest.mark.parametrize(("split", "margin"), [("val", 0.5), ("test", 0.4)])
def test_text_expert_wins_next_item(zoo: ZooPaths, processor, split: str, margin: float) -> None:
    base = tf.LlavaForConditionalGeneration.from_pretrained(zoo.base)
    vqa = tf.LlavaForConditionalGeneration.from_pretrained(zoo.vqa_expert)
    text = tf.LlamaForCausalLM.from_pretrained(zoo.text_expert)
    task = f"next_item_{split}"
    expert = _acc(zoo, processor, text, task)
    assert expert >= _acc(zoo, processor, base, task) + margin
    assert expert >= _acc(zoo, processor, vqa, task) + margin


def test_components_want_different_weights(zoo: ZooPaths, processor) -> None:
    """The zoo's point: vision and projector want the vqa-expert near 1, the language model near
    0.3 (its vqa change costs the text skill), so per-component weights beat any global pair."""
    from vlmexp.eval.evaluator import Evaluator
    from vlmexp.merge.engine import MergeEngine
    from vlmexp.merge.recipe import Recipe

    base = tf.LlavaForConditionalGeneration.from_pretrained(zoo.base)
    engine = MergeEngine(base, {"vqa": tf.LlavaForConditionalGeneration.from_pretrained(zoo.vqa_expert),
                                "text": tf.LlamaForCausalLM.from_pretrained(zoo.text_expert)},
                         device="cpu", progress=False)
    ev = Evaluator.from_config({
        "tasks": [str(zoo.evals / "color_shape_val.yaml"), str(zoo.evals / "next_item_val.yaml")],
        "objectives": {"combined": {"demo_color_shape_val": 1.0, "demo_next_item_val": 1.0}},
    }, processor)

    def combined(vision: float, lm: float, text: float) -> float:
        lm_part = {"vqa": {"weight": lm}, "text": {"weight": text}}
        engine.apply(Recipe.from_dict({
            "method": "task_arithmetic", "base": {"path": "base"},
            "donors": [{"name": "vqa", "path": "vqa"}, {"name": "text", "path": "text"}],
            "components": {"vision": {"vqa": {"weight": vision}},
                           "projector": {"vqa": {"weight": vision}},
                           "language": lm_part, "embed": lm_part, "head": lm_part}}))
        return ev.evaluate(engine.model).objectives["combined"]

    per_component = max(combined(v, a, t) for v in (0.8, 1.0) for a in (0.3, 0.4)
                        for t in (1.5, 2.0))
    global_pair = max(combined(w, w, t) for w in (0.3, 0.4, 0.5, 0.6) for t in (1.5, 2.0))
    assert per_component >= global_pair + 0.02
