"""lm-eval on the live in-memory model: every architecture, in-place changes, seeded subsets."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from vlmexp.errors import EvalError
from vlmexp.eval.lmeval import LmEvalRunner, text_only_inputs
from vlmexp.zoo.tiny import VLMS

EXAMPLES = Path(__file__).resolve().parents[1] / "evals" / "examples"
TASK = "example_next_item"
DOCS = [json.loads(x) for x in (EXAMPLES / "lm_eval" / "next_item.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runner():
    return LmEvalRunner([TASK], include_paths=[EXAMPLES / "lm_eval"], batch_size=4)


def _reference(model, tok, context: str, choice: str) -> float:
    """Causal log p(" " + choice | context), tokenized as lm-eval does (whole, then split)."""
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + " " + choice, add_special_tokens=False)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(input_ids=ids, **text_only_inputs(model, ids)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.parametrize("name", VLMS)
def test_loglikelihoods_match_causal_reference(name, runner, tiny, tiny_processor):
    model, tok = tiny(name), tiny_processor(name).tokenizer
    docs = [1, 4, 5, 7]
    out = runner.run(model, tok, {TASK: docs})[TASK]
    assert sorted(s["doc_id"] for s in out.samples) == docs
    right = []
    for sample in out.samples:
        doc = DOCS[sample["doc_id"]]
        assert sample["doc"] == doc
        got = [r[0] for r in sample["filtered_resps"]]
        want = [_reference(model, tok, doc["context"], c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
        # acc from the reference log-likelihoods: argmax (first of equals) is the gold label
        right.append(max(range(len(want)), key=want.__getitem__) == doc["label"])
    assert out.metrics["acc"] == sum(right) / len(docs)


def test_paligemma_text_needs_token_types(tiny):
    """Without token_type_ids PaliGemma is not causal: a later token changes earlier logits."""
    model = tiny("paligemma")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        bare = model(input_ids=ids).logits[0, :4] - model(input_ids=ids[:, :4]).logits[0]
        causal = (model(input_ids=ids, **text_only_inputs(model, ids)).logits[0, :4]
                  - model(input_ids=ids[:, :4], **text_only_inputs(model, ids[:, :4])).logits[0])
    assert bare.abs().max() > 1e-4
    assert causal.abs().max() == 0
    assert text_only_inputs(tiny("gemma3"), ids) == {}


def test_sees_in_place_weight_changes(runner, tiny, tiny_processor):
    model = copy.deepcopy(tiny("llava"))
    tok = tiny_processor("llava").tokenizer
    docs = {TASK: [0, 2, 5]}

    def logliks():
        out = runner.run(model, tok, docs)[TASK]
        return [r[0] for s in out.samples for r in s["filtered_resps"]]

    before = logliks()
    lm = runner._lm
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head.mul_(3.0)
    scaled = logliks()
    assert runner._lm is lm  # the same HFLM, no reload
    assert max(abs(a - b) for a, b in zip(before, scaled, strict=True)) > 1e-3
    with torch.no_grad():
        head.div_(3.0)
    assert logliks() == pytest.approx(before, abs=1e-5)


def test_unknown_task_is_an_error():
    with pytest.raises(EvalError, match="unknown lm-eval task 'no_such_task_xyz'") as err:
        LmEvalRunner(["no_such_task_xyz"], include_paths=[EXAMPLES / "lm_eval"],
                     where={"no_such_task_xyz": "evals/x.yaml"})
    assert str(err.value).startswith("evals/x.yaml: ")
