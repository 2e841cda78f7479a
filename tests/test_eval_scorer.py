"""The prefix-shared scorer equals one full forward per choice, on every tiny architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmexp.eval.prompt import ANSWER_PREFIX, image_prompt
from vlmexp.eval.scorer import (
    encode_continuation,
    encode_prefix,
    model_type,
    score_continuations,
    score_continuations_naive,
)
from vlmexp.zoo.tiny import VLMS, build
from vlmexp.zoo.tiny_processors import random_image

CHOICES = ["red", "green blue", "a small red circle", "yellow star cat dog"]


@pytest.mark.parametrize("name", VLMS)
def test_shared_prefix_equals_naive(name, tiny, tiny_processor):
    model, proc = tiny(name), tiny_processor(name)
    prefix = encode_prefix(proc, random_image(3), image_prompt(proc, "What colour is the shape?"),
                           model_type=model_type(model))
    assert (prefix["input_ids"] == model.config.image_token_id if hasattr(model.config, "image_token_id")
            else prefix["input_ids"] == model.config.image_token_index).any()
    conts = [encode_continuation(proc, ANSWER_PREFIX + c) for c in CHOICES]
    assert len({len(c) for c in conts}) > 1  # ragged: exercises the right padding
    fast = score_continuations(model, prefix, conts, batch_size=3)  # two chunks: 3 + 1
    naive = score_continuations_naive(model, prefix, conts)
    for f, n, c in zip(fast, naive, conts, strict=True):
        assert f.tokens == n.tokens == len(c)
        assert f.logprob == pytest.approx(n.logprob, abs=1e-4)
        assert f.logprob < 0
    # the scores differ between choices (a scorer that ignored the choice would fail here)
    assert len({round(s.logprob, 3) for s in fast}) == len(CHOICES)


def test_scores_depend_on_image(tiny, tiny_processor):
    model, proc = tiny("llava"), tiny_processor("llava")
    prompt = image_prompt(proc, "What colour is the shape?")
    conts = [encode_continuation(proc, " red green")]
    a = score_continuations(model, encode_prefix(proc, random_image(0), prompt), conts)[0].logprob
    b = score_continuations(model, encode_prefix(proc, random_image(1), prompt), conts)[0].logprob
    assert abs(a - b) > 1e-4


def test_one_token_answers_use_prefix_logits_only(tiny, tiny_processor):
    model, proc = tiny("idefics3"), tiny_processor("idefics3")
    prefix = encode_prefix(proc, random_image(), image_prompt(proc, "Colour?"))
    conts = [encode_continuation(proc, ANSWER_PREFIX + c) for c in ("red", "blue")]
    assert [len(c) for c in conts] == [1, 1]
    with torch.no_grad():
        logits = model(**prefix).logits[0, -1]
    expected = torch.log_softmax(logits, -1)[[c[0] for c in conts]].tolist()
    got = [s.logprob for s in score_continuations(model, prefix, conts)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert score_continuations(model, prefix, conts)[0].mean == pytest.approx(expected[0], abs=1e-5)


def test_boundary_tokenization_is_separate(tiny_processor):
    """Prompt and answer are tokenized apart: the answer's ids never merge into the prompt's."""
    proc = tiny_processor("llava")
    ids = encode_continuation(proc, ANSWER_PREFIX + "red")
    assert proc.tokenizer.convert_ids_to_tokens(ids) == ["▁red"]
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(build("llava"), {"input_ids": torch.tensor([[5]])}, [[]])


def test_paligemma_prompt_drops_processor_newline(tiny, tiny_processor):
    proc = tiny_processor("paligemma")
    prompt = image_prompt(proc, "Colour?")
    raw = proc(images=[random_image()], text=[prompt], return_tensors="pt")["input_ids"][0]
    enc = encode_prefix(proc, random_image(), prompt, model_type="paligemma")
    newline = proc.tokenizer.encode("\n", add_special_tokens=False)
    assert raw[-1].item() == newline[-1]
    assert enc["input_ids"][0].tolist() == raw[:-1].tolist()
    assert proc.tokenizer.decode(enc["input_ids"][0, -3:]).endswith(":")
    assert set(enc["token_type_ids"][0].tolist()) == {0}


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_gets_mm_token_types(name, tiny, tiny_processor):
    """3-D rope positions need mm_token_type_ids (1 on image pads): with the processor's ones the
    cached scorer equals the full forward (the cache continues the rope deltas); all-zero ones,
    which put the image on 1-D text positions, give other scores."""
    model, proc = copy.deepcopy(tiny(name)), tiny_processor(name)
    with torch.no_grad():  # sharper attention, so that positions move the scores well above noise
        for key, p in model.named_parameters():
            if "language_model" in key and ("q_proj" in key or "k_proj" in key):
                p.mul_(4.0)
    prefix = encode_prefix(proc, random_image(3), image_prompt(proc, "What colour is the shape?"),
                           model_type=name)
    image = prefix["input_ids"] == model.config.image_token_id
    assert image.sum() == 4 and torch.equal(prefix["mm_token_type_ids"].bool(), image)
    conts = [encode_continuation(proc, ANSWER_PREFIX + c) for c in CHOICES]
    with_types = [s.logprob for s in score_continuations(model, prefix, conts)]
    naive = [s.logprob for s in score_continuations_naive(model, prefix, conts)]
    assert with_types == pytest.approx(naive, abs=1e-5)
    zeros = {**prefix, "mm_token_type_ids": torch.zeros_like(prefix["mm_token_type_ids"])}
    for scorer in (score_continuations, score_continuations_naive):
        other = [s.logprob for s in scorer(model, zeros, conts)]
        assert max(abs(a - b) for a, b in zip(other, with_types, strict=True)) > 1e-3
    if name == "qwen2_5_vl":  # it runs without them too (1-D positions), and scores otherwise
        bare = {k: v for k, v in prefix.items() if k != "mm_token_type_ids"}
        other = [s.logprob for s in score_continuations_naive(model, bare, conts)]
        assert max(abs(a - b) for a, b in zip(other, with_types, strict=True)) > 1e-3


def test_qwen_text_prefix_after_an_image_prefix(tiny, tiny_processor):
    """Qwen-VL keeps the rope deltas of its last image prefix; a later prefix without an image
    must not continue from them."""
    model, proc = copy.deepcopy(tiny("qwen2_vl")), tiny_processor("qwen2_vl")
    ids = proc.tokenizer.encode("What colour is the shape? Answer:", add_special_tokens=False)
    cont = proc.tokenizer.encode(" red green", add_special_tokens=False)
    fresh = score_continuations(model, {"input_ids": torch.tensor([ids])}, [cont])[0].logprob
    prefix = encode_prefix(proc, random_image(3), image_prompt(proc, "What colour is the shape?"),
                           model_type="qwen2_vl")
    score_continuations(model, prefix, [encode_continuation(proc, " red")])
    assert model.model.rope_deltas is not None and int(model.model.rope_deltas.abs().max()) > 0
    again = score_continuations(model, {"input_ids": torch.tensor([ids])}, [cont])[0].logprob
    assert again == pytest.approx(fresh, abs=1e-6)
    assert fresh == pytest.approx(
        score_continuations_naive(model, {"input_ids": torch.tensor([ids])}, [cont])[0].logprob, abs=1e-5)
