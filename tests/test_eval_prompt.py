"""Prompt text: lm-eval's context/continuation split, one definition for training and scoring, and
the demo zoo's answers keeping their ids under the joint tokenization."""

from __future__ import annotations

import pytest

from vlmexp.errors import EvalError
from vlmexp.eval.prompt import (
    ANSWER_DELIMITER,
    MMBENCH_INSTRUCTION,
    image_prompt,
    mmbench_text,
    split_context,
)
from vlmexp.eval.scorer import encode_choices, encode_continuation
from vlmexp.zoo import data
from vlmexp.zoo.build import ZooSettings, build_processor
from vlmexp.zoo.tiny_processors import random_image
from vlmexp.zoo.tokenizers import build_tokenizer
from vlmexp.zoo.train import IGNORE, encode_image_items, encode_text_items


def test_split_context_adds_the_delimiter_or_moves_trailing_whitespace():
    assert ANSWER_DELIMITER == " "
    assert split_context("Q?\nAnswer:", "red") == ("Q?\nAnswer:", " red")
    assert split_context("<|im_start|>assistant\n", "red") == ("<|im_start|>assistant", "\nred")
    assert split_context("<start_of_turn>model\n", "top left") == ("<start_of_turn>model", "\ntop left")
    assert split_context("ASSISTANT: \n\t", "red") == ("ASSISTANT:", " \n\tred")
    for prompt in ("Answer:", "a\n", "b  "):
        assert "".join(split_context(prompt, "x")) in (prompt + " x", prompt + "x")
    with pytest.raises(ValueError, match="empty prompt"):
        split_context(" \n", "red")


def _demo_answers() -> list[str]:
    return [*data.COLOURS, *data.SHAPES, *data.POSITIONS,
            *(f"the shape is at the {p}" for p in data.POSITIONS),
            *(w for words in data.LISTS.values() for w in words)]


def test_demo_zoo_answers_keep_their_ids():
    """The demo zoo's word-level tokenizer gives every demo answer the ids it had when answers
    were encoded alone after a space, after every demo prompt: the demo study's numbers stay."""
    proc = build_processor(ZooSettings())
    tok = proc.tokenizer
    image_prompts = [image_prompt(proc, q) for q in (data.COLOUR_QUESTION, data.SHAPE_QUESTION,
                                                     data.POSITION_QUESTION, data.CAPTION_QUESTION)]
    pairs = [(prompt, answer) for prompt in image_prompts for answer in _demo_answers()]
    pairs += [(data.next_item_text(item.question), choice)  # the lm-eval task and its training
              for items in data.next_item_splits().values() for item in items for choice in item.choices]
    assert len(pairs) > 1000
    for prompt, answer in pairs:
        context, continuation = split_context(prompt, answer)
        assert (context, continuation) == (prompt, " " + answer)
        alone = tok(" " + answer, add_special_tokens=False)["input_ids"]
        assert encode_continuation(tok, context, continuation) == alone, (prompt, answer)
        assert tok.unk_token_id not in alone


@pytest.mark.parametrize(("kind", "chat"), [("demo", False), ("qwen2", True), ("gemma", True),
                                            ("llama", True), ("qwen2", False)])
def test_training_encodes_what_is_scored(kind, chat, kind_processor):
    """The zoo's training rows are the evaluator's prefix ids, then the continuation ids + eos."""
    if kind == "demo":
        proc = build_processor(ZooSettings())
    else:
        proc = kind_processor(kind, build_tokenizer(kind, chat_template=chat))
    tok = proc.tokenizer
    image = random_image(2, data.IMAGE_SIZE)
    answers = ["red", "top left"]
    encoded = encode_image_items(proc, [(image, data.COLOUR_QUESTION, a) for a in answers])
    prefix, conts = encode_choices(proc, image, image_prompt(proc, data.COLOUR_QUESTION), answers)
    prefix_ids = prefix["input_ids"][0].tolist()
    for row, cont in enumerate(conts):
        n = int(encoded.attention_mask[row].sum())
        ids, labels = encoded.input_ids[row, :n].tolist(), encoded.labels[row, :n].tolist()
        assert ids == prefix_ids + cont + [tok.eos_token_id]
        assert labels == [IGNORE] * len(prefix_ids) + cont + [tok.eos_token_id]
    text = encode_text_items(tok, [("Question: What comes after seven?\nAnswer:", "eight")])
    context, continuation = split_context("Question: What comes after seven?\nAnswer:", "eight")
    target = [i for i in text.labels[0].tolist() if i != IGNORE]
    assert target == encode_continuation(tok, context, continuation) + [tok.eos_token_id]


def test_mmbench_text_is_vlmevalkits_layout():
    """VLMEvalKit's ImageMCQDataset.build_prompt, character for character: the hint line only
    when there is a hint, the options lettered from A, the instruction line with its space."""
    assert mmbench_text("Which shape is shown?", ["square", "circle", "triangle"],
                        hint="One shape.") == (
        "Hint: One shape.\nQuestion: Which shape is shown?\nOptions:\nA. square\nB. circle\n"
        "C. triangle\nPlease select the correct answer from the options above. \n")
    assert mmbench_text("Colour?", ["red", "green", "blue", "yellow"]) == (
        "Question: Colour?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n"
        "Please select the correct answer from the options above. \n")
    assert MMBENCH_INSTRUCTION == "Please select the correct answer from the options above. \n"
    assert mmbench_text("Q?", [str(i) for i in range(26)]).count("\nZ. 25\n") == 1
    with pytest.raises(EvalError, match="27 options"):
        mmbench_text("Q?", [str(i) for i in range(27)])
